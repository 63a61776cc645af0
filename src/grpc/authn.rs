//! Caller authentication for the signing service.
//!
//! Two authenticators, tried in order, first success wins (as istiod does):
//!
//! 1. **mTLS**: a client certificate that chains to the mesh roots (rustls has verified the
//!    chain during the handshake); the identity is its SPIFFE URI.
//! 2. **Service-account JWT** (`authorization: Bearer …`): verified locally against the JWKS of
//!    the cluster named by the `clusterid` header — signature, `iss`, `aud`, `exp`/`nbf` with a
//!    small skew. Verified tokens are cached until they expire, so a renewal burst costs one
//!    signature check per token, not per request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::config::{ClusterAuth, Config, Loaded};
use crate::pki::spiffe::SpiffeId;

/// Why authentication failed. The variant names the reason for logs and metrics; callers
/// see only `Unauthenticated`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Neither a client certificate nor a bearer token.
    #[error("no credentials: neither a client certificate nor an authorization bearer token")]
    NoCredentials,
    /// `authorization` is not `Bearer <token>`.
    #[error("authorization header is not a bearer token")]
    NotBearer,
    /// The `clusterid` names no configured cluster (or one without token auth).
    #[error("unknown cluster {0:?}")]
    UnknownCluster(String),
    /// The token could not be decoded.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No JWKS key for the token.
    #[error("no key in the cluster's JWKS matches the token (kid {0:?})")]
    UnknownKey(Option<String>),
    /// Signature check failed.
    #[error("token signature does not verify")]
    BadSignature,
    /// Expired.
    #[error("token expired")]
    Expired,
    /// Not yet valid.
    #[error("token not yet valid")]
    NotYetValid,
    /// Wrong audience.
    #[error("token audience is not accepted")]
    Audience,
    /// Wrong issuer.
    #[error("token issuer is not the cluster's issuer")]
    Issuer,
    /// Not a service-account token.
    #[error("token does not name a Kubernetes service account")]
    NotServiceAccount,
    /// Algorithm not allowed.
    #[error("token algorithm {0:?} is not accepted (RS256, ES256)")]
    Algorithm(String),
    /// Client certificate without a usable SPIFFE ID.
    #[error("client certificate has no SPIFFE ID of the mesh: {0}")]
    BadClientCert(String),
    /// JWKS unavailable.
    #[error("JWKS for cluster {0:?} is not available")]
    NoJwks(String),
    /// The cluster's TokenReview refused the token or failed.
    #[error("TokenReview: {0}")]
    Review(String),
}

impl Error {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCredentials => "no_credentials",
            Self::NotBearer => "not_bearer",
            Self::UnknownCluster(_) => "unknown_cluster",
            Self::Malformed(_) => "malformed_token",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Issuer => "issuer",
            Self::NotServiceAccount => "not_service_account",
            Self::Algorithm(_) => "algorithm",
            Self::BadClientCert(_) => "client_cert",
            Self::NoJwks(_) => "no_jwks",
            Self::Review(_) => "token_review",
        }
    }
}

/// How the caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A service-account token.
    Jwt,
    /// A client certificate.
    Mtls,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's SPIFFE identity.
    pub identity: SpiffeId,
    /// The cluster the caller belongs to (its credentials were checked against it).
    pub cluster: String,
    /// How it authenticated.
    pub method: Method,
    /// Pod name from the token, when bound to a pod.
    pub pod: Option<String>,
    /// Node name from the token, when bound to a pod on a node (Kubernetes ≥ 1.30).
    pub node: Option<String>,
}

/// The claims cactl reads from a projected service-account token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<K8sClaims>,
}

#[derive(Debug, Deserialize)]
struct K8sClaims {
    namespace: Option<String>,
    serviceaccount: Option<NamedRef>,
    pod: Option<NamedRef>,
    node: Option<NamedRef>,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    name: String,
}

/// Where a cluster's token keys come from.
#[derive(Clone)]
pub enum JwksSource {
    /// A JWKS document on disk, re-read on refresh.
    File(PathBuf),
    /// A JWKS URL.
    Url(String),
    /// A fixed set (the development issuer, tests).
    Static(Arc<JwkSet>),
    /// The cluster's own `/openid/v1/jwks`, through its API credentials.
    Kube(kube::Client),
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "File({})", p.display()),
            Self::Url(u) => write!(f, "Url({u})"),
            Self::Static(_) => f.write_str("Static"),
            Self::Kube(_) => f.write_str("Kube"),
        }
    }
}

/// One cluster's token verifier.
pub struct ClusterTokens {
    cluster: String,
    issuer: String,
    audiences: Vec<String>,
    source: Option<JwksSource>,
    review: Option<kube::Client>,
    keys: ArcSwap<HashMap<Option<String>, (DecodingKey, Algorithm)>>,
    refresh_every: Duration,
    last_refresh: std::sync::Mutex<Option<Instant>>,
    http: Option<reqwest::Client>,
}

impl std::fmt::Debug for ClusterTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTokens")
            .field("cluster", &self.cluster)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Minimum time between two JWKS fetches triggered by unknown `kid`s.
const MIN_REFETCH: Duration = Duration::from_secs(10);

impl ClusterTokens {
    /// A verifier for `cluster`.
    /// `source` verifies tokens locally; `review`, when set, asks the cluster (TokenReview) for
    /// tokens the local keys cannot judge.
    pub fn new(
        cluster: &str,
        issuer: &str,
        audiences: Vec<String>,
        source: Option<JwksSource>,
        review: Option<kube::Client>,
        refresh_every: Duration,
        http: Option<reqwest::Client>,
    ) -> Self {
        Self {
            cluster: cluster.to_owned(),
            issuer: issuer.to_owned(),
            audiences,
            source,
            review,
            keys: ArcSwap::from_pointee(HashMap::new()),
            refresh_every,
            last_refresh: std::sync::Mutex::new(None),
            http,
        }
    }

    /// Loads the JWKS now.
    pub async fn refresh(&self) -> Result<usize, String> {
        let Some(source) = &self.source else {
            return Ok(0);
        };
        let set: JwkSet = match source {
            JwksSource::Static(s) => (**s).clone(),
            JwksSource::Kube(client) => {
                let req = http::Request::get("/openid/v1/jwks")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let text = tokio::time::timeout(Duration::from_secs(10), client.request_text(req))
                    .await
                    .map_err(|_| "GET /openid/v1/jwks timed out".to_owned())?
                    .map_err(|e| format!("GET /openid/v1/jwks: {e}"))?;
                serde_json::from_str(&text).map_err(|e| format!("parse /openid/v1/jwks: {e}"))?
            }
            JwksSource::File(p) => {
                let text = tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| format!("read {}: {e}", p.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", p.display()))?
            }
            JwksSource::Url(u) => {
                let http = self.http.as_ref().ok_or("no HTTP client")?;
                let resp = http
                    .get(u)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| format!("GET {u}: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("GET {u}: HTTP {}", resp.status()));
                }
                resp.json().await.map_err(|e| format!("GET {u}: {e}"))?
            }
        };
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                    if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            if let Ok(k) = DecodingKey::from_jwk(jwk) {
                keys.insert(jwk.common.key_id.clone(), (k, alg));
            }
        }
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        if let Ok(mut last) = self.last_refresh.lock() {
            *last = Some(Instant::now());
        }
        Ok(n)
    }

    fn due(&self, min: Duration) -> bool {
        match self.last_refresh.lock() {
            Ok(last) => last.is_none_or(|t| t.elapsed() >= min),
            Err(_) => true,
        }
    }

    /// Refreshes if the periodic interval has passed.
    pub async fn refresh_if_stale(&self) {
        if self.due(self.refresh_every)
            && let Err(e) = self.refresh().await
        {
            tracing::warn!(cluster = %self.cluster, error = %e, "JWKS refresh failed; keeping the previous keys");
        }
    }

    /// Verifies `token` (locally, or by TokenReview when the local keys cannot judge it and a
    /// review client is configured) and returns the identity it proves with its cache expiry.
    pub async fn verify(
        &self,
        token: &str,
        trust_domain: &str,
        skew: Duration,
    ) -> Result<(Caller, i64), Error> {
        let local = if self.source.is_some() {
            self.verify_local(token, trust_domain, skew).await
        } else {
            Err(Error::NoJwks(self.cluster.clone()))
        };
        match (&local, &self.review) {
            (Err(Error::UnknownKey(_) | Error::NoJwks(_) | Error::Algorithm(_)), Some(client)) => {
                self.token_review(client, token, trust_domain).await
            }
            _ => local,
        }
    }

    async fn token_review(
        &self,
        client: &kube::Client,
        token: &str,
        trust_domain: &str,
    ) -> Result<(Caller, i64), Error> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
        let done = tokio::time::timeout(
            Duration::from_secs(10),
            api.create(&kube::api::PostParams::default(), &review),
        )
        .await
        .map_err(|_| Error::Review("TokenReview timed out".into()))?
        .map_err(|e| Error::Review(e.to_string()))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Error::Review(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if let Some(auds) = &status.audiences
            && !auds.iter().any(|a| self.audiences.contains(a))
        {
            return Err(Error::Audience);
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let groups = user.groups.unwrap_or_default();
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(Error::NotServiceAccount);
        }
        let (ns, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .ok_or(Error::NotServiceAccount)?;
        let identity = SpiffeId::new(trust_domain, ns, sa).map_err(|_| Error::NotServiceAccount)?;
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        // A review verdict is cached for at most five minutes (a deleted pod's token stops
        // working within that), and never past the token's own expiry.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let exp = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
            .ok()
            .and_then(|d| d.claims.get("exp").and_then(serde_json::Value::as_i64))
            .unwrap_or(now + 300)
            .min(now + 300);
        Ok((
            Caller {
                identity,
                cluster: self.cluster.clone(),
                method: Method::Jwt,
                pod: first("authentication.kubernetes.io/pod-name"),
                node: first("authentication.kubernetes.io/node-name"),
            },
            exp,
        ))
    }

    async fn verify_local(
        &self,
        token: &str,
        trust_domain: &str,
        skew: Duration,
    ) -> Result<(Caller, i64), Error> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(e.to_string()))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(Error::Algorithm(format!("{:?}", header.alg)));
        }
        let mut keys = self.keys.load_full();
        if !keys.contains_key(&header.kid) && self.due(MIN_REFETCH) {
            if let Err(e) = self.refresh().await {
                tracing::warn!(cluster = %self.cluster, error = %e, "JWKS fetch for unknown kid failed");
            }
            keys = self.keys.load_full();
        }
        if keys.is_empty() {
            return Err(Error::NoJwks(self.cluster.clone()));
        }
        // Tokens without a kid may match any key of the right algorithm.
        let candidates: Vec<&(DecodingKey, Algorithm)> = match keys.get(&header.kid) {
            Some(k) => vec![k],
            None if header.kid.is_none() => {
                keys.values().filter(|(_, a)| *a == header.alg).collect()
            }
            None => return Err(Error::UnknownKey(header.kid)),
        };
        if candidates.is_empty() {
            return Err(Error::UnknownKey(header.kid));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&self.audiences);
        validation.set_issuer(&[&self.issuer]);
        validation.leeway = skew.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut last = Error::BadSignature;
        for (key, alg) in candidates {
            if *alg != header.alg {
                last = Error::Algorithm(format!("{:?}", header.alg));
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, key, &validation) {
                Ok(data) => return self.caller(data.claims, trust_domain),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature => Error::Expired,
                        K::ImmatureSignature => Error::NotYetValid,
                        K::InvalidAudience => Error::Audience,
                        K::InvalidIssuer => Error::Issuer,
                        K::InvalidSignature => Error::BadSignature,
                        K::MissingRequiredClaim(c) => {
                            Error::Malformed(format!("missing claim {c}"))
                        }
                        other => Error::Malformed(format!("{other:?}")),
                    };
                    if !matches!(last, Error::BadSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn caller(
        &self,
        claims: serde_json::Value,
        trust_domain: &str,
    ) -> Result<(Caller, i64), Error> {
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let c: Claims =
            serde_json::from_value(claims).map_err(|e| Error::Malformed(e.to_string()))?;
        let from_k8s = c.kubernetes.as_ref().and_then(|k| {
            Some((
                k.namespace.clone()?,
                k.serviceaccount.as_ref()?.name.clone(),
            ))
        });
        let from_sub = c.sub.as_deref().and_then(|s| {
            let rest = s.strip_prefix("system:serviceaccount:")?;
            let (ns, sa) = rest.split_once(':')?;
            Some((ns.to_owned(), sa.to_owned()))
        });
        let (ns, sa) = from_k8s.or(from_sub).ok_or(Error::NotServiceAccount)?;
        let identity =
            SpiffeId::new(trust_domain, &ns, &sa).map_err(|_| Error::NotServiceAccount)?;
        let pod = c
            .kubernetes
            .as_ref()
            .and_then(|k| k.pod.as_ref())
            .map(|p| p.name.clone());
        let node = c
            .kubernetes
            .as_ref()
            .and_then(|k| k.node.as_ref())
            .map(|n| n.name.clone());
        Ok((
            Caller {
                identity,
                cluster: self.cluster.clone(),
                method: Method::Jwt,
                pod,
                node,
            },
            exp,
        ))
    }
}

/// Verified tokens by digest: the caller, the token's `exp` and when it was verified (Unix
/// seconds). A lookup is a hash-table probe under a shard lock, without bookkeeping on the side:
/// it happens on every request.
type TokenCache = quick_cache::sync::Cache<[u8; 32], Arc<(Caller, i64, i64)>>;

/// A cached verification is redone after this long even if the token is still valid, so a
/// key removed from a cluster's JWKS stops authenticating within it.
const CACHE_TTL_SECS: i64 = 3600;

/// All clusters' token verifiers plus the verified-token cache.
pub struct TokenAuthenticator {
    clusters: HashMap<String, Arc<ClusterTokens>>,
    default_cluster: Option<String>,
    trust_domain: String,
    skew: Duration,
    cache: Option<TokenCache>,
    hits: Counter,
    misses: Counter,
}

impl std::fmt::Debug for TokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthenticator")
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenAuthenticator {
    /// Builds verifiers from the config. `dev_jwks` is the development issuer's key set, used
    /// for clusters with `auth.dev_issuer`; `hits` and `misses` count cache use.
    pub async fn from_loaded(
        loaded: &Loaded,
        dev_jwks: Option<Arc<JwkSet>>,
        hits: Counter,
        misses: Counter,
    ) -> Result<Self, String> {
        let config = &loaded.config;
        let http = reqwest_client(loaded)?;
        let mut clusters = HashMap::new();
        for c in &config.clusters {
            let Some(auth) = &c.auth else { continue };
            let audiences = if auth.audiences.is_empty() {
                config.serve.audiences.clone()
            } else {
                auth.audiences.clone()
            };
            let needs_client = auth.jwks_from_cluster || auth.token_review;
            let client = if needs_client {
                Some(
                    crate::cluster::client(loaded, c, Some(Duration::from_secs(15)))
                        .await
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            let (issuer, source) = source_for(loaded, auth, dev_jwks.as_ref(), client.clone())
                .map_err(|e| format!("cluster {:?}: {e}", c.name))?;
            let review = if auth.token_review { client } else { None };
            if source.is_none() && review.is_none() {
                continue;
            }
            clusters.insert(
                c.name.clone(),
                Arc::new(ClusterTokens::new(
                    &c.name,
                    &issuer,
                    audiences,
                    source,
                    review,
                    auth.jwks_refresh,
                    http.clone(),
                )),
            );
        }
        Ok(Self::with_clusters(config, clusters, hits, misses))
    }

    /// Builds the authenticator from ready verifiers.
    pub fn with_clusters(
        config: &Config,
        clusters: HashMap<String, Arc<ClusterTokens>>,
        hits: Counter,
        misses: Counter,
    ) -> Self {
        let default_cluster = config
            .serve
            .default_cluster
            .clone()
            .or_else(|| config.clusters.first().map(|c| c.name.clone()));
        let cache = (config.serve.token_cache_entries > 0).then(|| {
            quick_cache::sync::Cache::new(
                usize::try_from(config.serve.token_cache_entries).unwrap_or(usize::MAX),
            )
        });
        Self {
            clusters,
            default_cluster,
            trust_domain: config.trust_domain.clone(),
            skew: config.serve.clock_skew,
            cache,
            hits,
            misses,
        }
    }

    /// The per-cluster verifiers (for periodic refresh).
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<ClusterTokens>> {
        self.clusters.values()
    }

    /// Authenticates a bearer token for the cluster named in `clusterid` (empty: the default).
    pub async fn authenticate(
        &self,
        authorization: &str,
        cluster_id: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Caller, Error> {
        let token = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Error::NotBearer)?;
        let cluster = match cluster_id.filter(|c| !c.is_empty()) {
            Some(c) => c,
            None => self.default_cluster.as_deref().unwrap_or(""),
        };
        let verifier = self
            .clusters
            .get(cluster)
            .ok_or_else(|| Error::UnknownCluster(cluster.to_owned()))?;
        let key = cache_key(cluster, token);
        let skew = self.skew.as_secs() as i64;
        let now_secs = now.unix_timestamp();
        if let Some(cache) = &self.cache
            && let Some(hit) = cache.get(&key)
        {
            // Still valid (with the same skew the verifier allows), and verified recently?
            if hit.1 + skew >= now_secs && now_secs - hit.2 < CACHE_TTL_SECS {
                self.hits.inc();
                return Ok(hit.0.clone());
            }
            cache.remove(&key);
        }
        self.misses.inc();
        let (caller, exp) = verifier
            .verify(token, &self.trust_domain, self.skew)
            .await?;
        if let Some(cache) = &self.cache {
            cache.insert(key, Arc::new((caller.clone(), exp, now_secs)));
        }
        Ok(caller)
    }
}

fn source_for(
    loaded: &Loaded,
    auth: &ClusterAuth,
    dev: Option<&Arc<JwkSet>>,
    client: Option<kube::Client>,
) -> Result<(String, Option<JwksSource>), String> {
    if auth.dev_issuer {
        let set = dev.ok_or("dev_issuer is set but the development issuer is not available")?;
        return Ok((
            crate::devtoken::ISSUER.to_owned(),
            Some(JwksSource::Static(set.clone())),
        ));
    }
    let issuer = auth.issuer.clone().unwrap_or_default();
    if let Some(f) = &auth.jwks_file {
        return Ok((issuer, Some(JwksSource::File(loaded.resolve(f)))));
    }
    if let Some(u) = &auth.jwks_url {
        return Ok((issuer, Some(JwksSource::Url(u.clone()))));
    }
    if auth.jwks_from_cluster {
        let c = client.ok_or("jwks_from_cluster needs API access")?;
        return Ok((issuer, Some(JwksSource::Kube(c))));
    }
    Ok((issuer, None))
}

fn reqwest_client(loaded: &Loaded) -> Result<Option<reqwest::Client>, String> {
    let urls: Vec<&ClusterAuth> = loaded
        .config
        .clusters
        .iter()
        .filter_map(|c| c.auth.as_ref())
        .filter(|a| a.jwks_url.is_some())
        .collect();
    if urls.is_empty() {
        return Ok(None);
    }
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    for a in urls {
        if let Some(ca) = &a.jwks_ca_file {
            let ca = loaded.resolve(ca);
            let pem =
                std::fs::read(&ca).map_err(|e| format!("jwks_ca_file {}: {e}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("jwks_ca_file {}: {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
    }
    builder.build().map(Some).map_err(|e| e.to_string())
}

fn cache_key(cluster: &str, token: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(cluster.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Identity from a client certificate chain that rustls has already verified against the mesh
/// roots: exactly one SPIFFE URI in the trust domain.
pub fn mtls_caller(leaf_der: &[u8], trust_domain: &str, cluster: &str) -> Result<Caller, Error> {
    let info = crate::pki::cert::CertInfo::from_der(leaf_der)
        .map_err(|e| Error::BadClientCert(e.to_string()))?;
    let [uri] = info.uris.as_slice() else {
        return Err(Error::BadClientCert(format!(
            "{} URI SANs",
            info.uris.len()
        )));
    };
    let id = SpiffeId::parse(uri).map_err(|e| Error::BadClientCert(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(Error::BadClientCert(format!(
            "{id} is outside the trust domain"
        )));
    }
    Ok(Caller {
        identity: id,
        cluster: cluster.to_owned(),
        method: Method::Mtls,
        pod: None,
        node: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache answers repeat tokens, but never past the token's `exp` (plus skew) and never
    /// more than an hour after the verification it remembers.
    #[tokio::test]
    async fn cached_verifications_end_with_the_token_or_after_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let dev = crate::devtoken::DevIssuer::open(dir.path()).unwrap();
        let verifier = ClusterTokens::new(
            "east",
            crate::devtoken::ISSUER,
            vec!["istio-ca".into()],
            Some(JwksSource::Static(Arc::new(dev.jwks().unwrap()))),
            None,
            Duration::from_secs(3600),
            None,
        );
        let (hits, misses) = (Counter::default(), Counter::default());
        let auth = TokenAuthenticator::with_clusters(
            &Config::default(),
            HashMap::from([("east".to_owned(), Arc::new(verifier))]),
            hits.clone(),
            misses.clone(),
        );
        for c in auth.clusters() {
            c.refresh_if_stale().await;
        }
        let now = OffsetDateTime::now_utc();
        let token = dev
            .token(
                "shop",
                "web",
                "istio-ca",
                now,
                time::Duration::hours(2),
                None,
            )
            .unwrap();
        let bearer = format!("Bearer {token}");
        let at = |secs: i64| {
            auth.authenticate(&bearer, Some("east"), now + time::Duration::seconds(secs))
        };
        let counts = || (hits.get(), misses.get());

        let caller = at(0).await.unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(counts(), (0, 1));
        at(10).await.unwrap();
        assert_eq!(counts(), (1, 1));
        // An hour after it was verified, the token is verified again (it is still valid).
        at(CACHE_TTL_SECS).await.unwrap();
        assert_eq!(counts(), (1, 2));
        at(CACHE_TTL_SECS + 1).await.unwrap();
        assert_eq!(counts(), (2, 2));
        // Past `exp` + skew the cache does not answer; the verifier decides.
        let _ = at(2 * 3600 + 61).await;
        assert_eq!(counts(), (2, 3));
        // Another cluster's name never reads this cluster's entry.
        assert!(matches!(
            auth.authenticate(&bearer, Some("west"), now).await,
            Err(Error::UnknownCluster(_))
        ));
    }
}
