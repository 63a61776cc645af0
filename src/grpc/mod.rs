//! Istio's `IstioCertificateService` over gRPC: authenticate, authorize, sign, respond.
//!
//! Errors map to gRPC codes in one place ([`Failure::status`]): authentication →
//! `Unauthenticated`; a bad CSR or TTL → `InvalidArgument`; an identity the caller may not have
//! (mismatch, impersonation denied) → `PermissionDenied`; no issuer for the cluster →
//! `Unavailable`; anything else → `Internal`, with details logged and not returned.

pub mod authn;
pub mod node_authz;

/// Generated protobuf and gRPC code for `istio.v1.auth`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use self::authn::{Caller, TokenAuthenticator};
use self::node_authz::PodIndex;
use self::proto::istio_certificate_service_server::IstioCertificateService;
use self::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::authority::Authority;
use crate::config::{Config, VerifyIssued};
use crate::policy::WorkloadPolicy;
use crate::telemetry::{Metrics, ReasonLabel, RequestLabels};

/// Why a request failed, before it becomes a gRPC status.
#[derive(Debug)]
pub enum Failure {
    /// Authentication failed.
    Unauthenticated(authn::Error),
    /// The CSR or the TTL is unacceptable.
    InvalidArgument(String),
    /// The caller may not have this identity.
    PermissionDenied(String),
    /// No issuer for the cluster.
    Unavailable(String),
    /// Anything else; the detail is logged, not returned.
    Internal(String),
}

impl Failure {
    /// The gRPC status sent to the client.
    pub fn status(&self) -> Status {
        match self {
            Self::Unauthenticated(_) => Status::unauthenticated("request authenticate failure"),
            Self::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            Self::PermissionDenied(m) => Status::permission_denied(m.clone()),
            Self::Unavailable(m) => Status::unavailable(m.clone()),
            Self::Internal(_) => Status::internal("internal error"),
        }
    }
}

/// The client certificate chain rustls verified against the mesh roots during the handshake
/// (mTLS), attached to every request of that connection.
#[derive(Clone, Debug)]
pub struct PeerCertificates(pub Arc<Vec<rustls::pki_types::CertificateDer<'static>>>);

/// The service: shared, immutable configuration plus swappable issuers.
pub struct CaService {
    authority: Arc<Authority>,
    tokens: Arc<TokenAuthenticator>,
    pods: HashMap<String, Arc<dyn PodIndex>>,
    policy: WorkloadPolicy,
    trusted_node_accounts: Vec<String>,
    default_cluster: Option<String>,
    verify: VerifyIssued,
    metrics: Arc<Metrics>,
    /// `requests{cluster, code="Ok"}` of every configured cluster, looked up once: the success
    /// path then counts without formatting a label or locking the family.
    issued: HashMap<String, prometheus_client::metrics::counter::Counter>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService").finish_non_exhaustive()
    }
}

impl CaService {
    /// Builds the service.
    pub fn new(
        config: &Config,
        authority: Arc<Authority>,
        tokens: Arc<TokenAuthenticator>,
        pods: HashMap<String, Arc<dyn PodIndex>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authority,
            tokens,
            pods,
            policy: config.workload_policy(),
            trusted_node_accounts: config.serve.trusted_node_accounts.clone(),
            default_cluster: config
                .serve
                .default_cluster
                .clone()
                .or_else(|| config.clusters.first().map(|c| c.name.clone())),
            verify: config.serve.verify_issued,
            issued: config
                .clusters
                .iter()
                .map(|c| {
                    let labels = RequestLabels {
                        cluster: c.name.clone(),
                        code: format!("{:?}", tonic::Code::Ok),
                    };
                    (
                        c.name.clone(),
                        metrics.requests.get_or_create(&labels).clone(),
                    )
                })
                .collect(),
            metrics,
        }
    }

    async fn authenticate(
        &self,
        request: &Request<IstioCertificateRequest>,
    ) -> Result<Caller, authn::Error> {
        let md = request.metadata();
        let cluster_id = md.get("clusterid").and_then(|v| v.to_str().ok());
        // 1. A verified client certificate (rustls checked it against the mesh roots).
        if let Some(PeerCertificates(certs)) = request.extensions().get::<PeerCertificates>()
            && let Some(leaf) = certs.first()
        {
            let cluster = cluster_id
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .or_else(|| self.default_cluster.clone())
                .unwrap_or_default();
            return authn::mtls_caller(leaf, &self.policy.trust_domain, &cluster);
        }
        // 2. A service-account token.
        let Some(auth) = md.get("authorization") else {
            return Err(authn::Error::NoCredentials);
        };
        let auth = auth.to_str().map_err(|_| authn::Error::NotBearer)?;
        self.tokens
            .authenticate(auth, cluster_id, OffsetDateTime::now_utc())
            .await
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
        cluster_out: &mut String,
    ) -> Result<IstioCertificateResponse, Failure> {
        let caller = self.authenticate(&request).await.map_err(|e| {
            self.metrics
                .auth_failures
                .get_or_create(&ReasonLabel {
                    reason: e.reason().into(),
                })
                .inc();
            tracing::info!(reason = %e, "authentication failed");
            Failure::Unauthenticated(e)
        })?;
        cluster_out.clone_from(&caller.cluster);
        let req = request.into_inner();

        // Whose certificate is this? The caller's, or an impersonated workload's.
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            });
        let subject = match impersonated {
            None => caller.identity.clone(),
            Some(requested) => node_authz::authorize(
                &caller,
                &requested,
                &self.policy.trust_domain,
                &self.trusted_node_accounts,
                self.pods.get(&caller.cluster).map(|p| p.as_ref() as &dyn PodIndex),
            )
            .map_err(|e| {
                tracing::info!(caller = %caller.identity, requested = %requested, reason = %e, "impersonation denied");
                Failure::PermissionDenied(format!("impersonation denied: {e}"))
            })?,
        };

        let csr = crate::pki::csr::parse_pem_and_verify(&req.csr)
            .map_err(|e| Failure::InvalidArgument(format!("CSR: {e}")))?;
        let ttl =
            (req.validity_duration > 0).then(|| time::Duration::seconds(req.validity_duration));
        let approved = self
            .policy
            .evaluate(&csr, ttl, Some(&subject))
            .map_err(|e| match e {
                crate::policy::Error::IdentityMismatch { .. } => {
                    Failure::PermissionDenied(e.to_string())
                }
                _ => Failure::InvalidArgument(e.to_string()),
            })?;

        let set = self.authority.current();
        let issuer = set.get(&caller.cluster).ok_or_else(|| {
            Failure::Unavailable(format!(
                "no issuer is ready for cluster {:?}",
                caller.cluster
            ))
        })?;
        let now = OffsetDateTime::now_utc();
        let (leaf, serial) = issuer
            .sign_checked(&approved, now, self.verify == VerifyIssued::Full)
            .map_err(|e| Failure::Internal(e.to_string()))?;
        let chain = issuer.response_chain(&leaf);
        tracing::info!(
            cluster = caller.cluster.as_str(),
            identity = %approved.identity,
            caller = %caller.identity,
            serial = serial.as_str(),
            ttl_secs = approved.ttl.whole_seconds(),
            ttl_clamped = approved.ttl_clamped,
            "issued workload certificate"
        );
        Ok(IstioCertificateResponse { cert_chain: chain })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        let mut cluster = String::new();
        let result = self.handle(request, &mut cluster).await;
        match (&result, self.issued.get(&cluster)) {
            (Ok(_), Some(counter)) => {
                counter.inc();
            }
            _ => {
                let code = match &result {
                    Ok(_) => tonic::Code::Ok,
                    Err(f) => f.status().code(),
                };
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        cluster,
                        code: format!("{code:?}"),
                    })
                    .inc();
            }
        }
        match result {
            Ok(resp) => {
                self.metrics
                    .sign_seconds
                    .observe(start.elapsed().as_secs_f64());
                Ok(Response::new(resp))
            }
            Err(f) => {
                if let Failure::Internal(detail) = &f {
                    tracing::error!(error = %detail, "CreateCertificate failed");
                }
                Err(f.status())
            }
        }
    }
}
