//! TLS for the signing service: a serving certificate issued by cactl itself (so it chains to
//! the root in `istio-ca-root-cert`), renewed before expiry without a restart, ALPN `h2`
//! (Istio ≥ 1.24 clients insist on it), TLS 1.2 and 1.3, and optional client certificates
//! verified against the mesh roots (mTLS authentication).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::ca::ClusterIssuer;
use crate::pki::cert::CertInfo;
use crate::pki::key::{KeyAlgorithm, SecretKey};
use crate::pki::template::{self, ServerSpec};

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Certificate issuance failed.
    #[error("serving certificate: {0}")]
    Issue(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// The crypto provider cactl uses everywhere: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider (other crates pull in aws-lc-rs too, and
/// rustls cannot choose between two on its own).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A serving certificate with its validity.
#[derive(Debug)]
pub struct Serving {
    /// What rustls presents.
    pub key: Arc<CertifiedKey>,
    /// Its NotBefore.
    pub not_before: OffsetDateTime,
    /// Its NotAfter.
    pub not_after: OffsetDateTime,
    /// Serial (hex).
    pub serial: String,
}

impl Serving {
    /// When to renew: two thirds into the lifetime.
    pub fn renew_at(&self) -> OffsetDateTime {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

/// A serving certificate as PEM, for distribution (istiod's `istiod-tls`).
pub struct ServingPem {
    /// Leaf then intermediates.
    pub chain_pem: String,
    /// The key.
    pub key: SecretKey,
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

/// A freshly issued serving certificate: leaf DER, intermediates, key, facts.
struct Issued {
    leaf: Vec<u8>,
    key: SecretKey,
    info: CertInfo,
}

/// Issues a server certificate from `issuer` for `dns_names`, with a new key of the issuer's
/// family (ECDSA P-256/P-384 for EC issuers, RSA-2048 for RSA ones).
fn issue(
    issuer: &ClusterIssuer,
    organization: &str,
    dns_names: &[String],
    lifetime: time::Duration,
    now: OffsetDateTime,
) -> Result<Issued, Error> {
    let alg = match issuer.signer().key().algorithm() {
        KeyAlgorithm::EcdsaP384 => KeyAlgorithm::EcdsaP384,
        a if a.is_rsa() => KeyAlgorithm::Rsa2048,
        _ => KeyAlgorithm::EcdsaP256,
    };
    let key = SecretKey::generate(alg).map_err(|e| Error::Issue(e.to_string()))?;
    let spec = ServerSpec {
        organization: organization.to_owned(),
        dns_names: dns_names.to_vec(),
        now,
        lifetime,
        rsa_key: alg.is_rsa(),
    };
    let rng = ring::rand::SystemRandom::new();
    let leaf = template::sign_server(&spec, &key.public_key_spki(), issuer.signer(), &rng)
        .map_err(|e| Error::Issue(e.to_string()))?;
    let info = CertInfo::from_der(&leaf).map_err(|e| Error::Issue(e.to_string()))?;
    Ok(Issued { leaf, key, info })
}

/// Issues a serving certificate from `issuer` for `dns_names`, as PEM.
pub fn issue_serving_pem(
    issuer: &ClusterIssuer,
    organization: &str,
    dns_names: &[String],
    lifetime: time::Duration,
    now: OffsetDateTime,
) -> Result<ServingPem, Error> {
    let i = issue(issuer, organization, dns_names, lifetime, now)?;
    let mut chain_pem = crate::pki::pem::encode_cert(&i.leaf);
    for d in issuer.intermediates() {
        chain_pem.push_str(&crate::pki::pem::encode_cert(d));
    }
    Ok(ServingPem {
        chain_pem,
        key: i.key,
        not_before: i.info.not_before,
        not_after: i.info.not_after,
    })
}

/// Issues the signing service's own serving certificate from `issuer` for `dns_names`.
pub fn issue_serving(
    issuer: &ClusterIssuer,
    organization: &str,
    dns_names: &[String],
    lifetime: time::Duration,
    now: OffsetDateTime,
) -> Result<Serving, Error> {
    let i = issue(issuer, organization, dns_names, lifetime, now)?;
    let mut chain = vec![CertificateDer::from(i.leaf)];
    chain.extend(
        issuer
            .intermediates()
            .iter()
            .map(|d| CertificateDer::from(d.clone())),
    );
    let pkcs8 = i.key.to_pkcs8_der();
    let signing = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pkcs8.to_vec(),
        )))?;
    Ok(Serving {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_before: i.info.not_before,
        not_after: i.info.not_after,
        serial: i.info.serial_hex,
    })
}

/// A certificate resolver whose certificate can be replaced while connections come in.
#[derive(Debug)]
pub struct SwappableCert {
    current: ArcSwap<CertifiedKey>,
}

impl SwappableCert {
    /// Starts with `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self {
            current: ArcSwap::new(key),
        }
    }

    /// Replaces the certificate for new handshakes.
    pub fn swap(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The server configuration: our certificate, optional client certificates verified against
/// `roots`, ALPN h2 only.
pub fn server_config(
    cert: Arc<SwappableCert>,
    roots: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, Error> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .map_err(|e| Error::Verifier(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Lifetime of the istiod serving certificates cactl distributes (renewed at two thirds).
pub const ISTIOD_TLS_LIFETIME: time::Duration = time::Duration::days(30);

/// External-mode clusters whose istiod serving certificate must be issued or renewed: none
/// yet, two thirds of its life gone, or issued by an intermediate the cluster no longer uses.
pub fn istiod_tls_due(
    state: &crate::state::State,
    config: &crate::config::Config,
    now: OffsetDateTime,
) -> Vec<String> {
    config
        .clusters
        .iter()
        .filter(|c| c.mode == crate::config::ClusterMode::External && c.istiod_tls)
        .filter(|c| {
            let cs = state.clusters.get(&c.name);
            let current = cs
                .and_then(|s| s.current.as_ref())
                .and_then(|r| crate::pki::pem::certificates(&r.cert_pem).ok());
            let Some(current) = current else {
                // Nothing to issue it with yet.
                return false;
            };
            cs.and_then(|s| s.istiod_tls.as_ref()).is_none_or(|r| {
                r.due(now)
                    || crate::pki::pem::certificates(&r.cert_pem)
                        .ok()
                        .and_then(|chain| chain.get(1).cloned())
                        .as_ref()
                        != current.first()
            })
        })
        .map(|c| c.name.clone())
        .collect()
}

/// Issues istiod serving certificates where [`istiod_tls_due`] says so, into the state (the
/// caller saves it before pushing). Returns the clusters it issued for.
pub fn refresh_istiod_tls(
    state: &mut crate::state::State,
    config: &crate::config::Config,
    now: OffsetDateTime,
) -> Result<Vec<String>, crate::ca::Error> {
    let due = istiod_tls_due(state, config, now);
    for name in &due {
        let Some(c) = config.cluster(name) else {
            continue;
        };
        let issuer = ClusterIssuer::load_at(state, config, name, now)?;
        let names = vec![
            format!("istiod.{}.svc", c.namespace),
            format!("istiod.{}.svc.cluster.local", c.namespace),
        ];
        let s = issue_serving_pem(
            &issuer,
            &config.organization,
            &names,
            ISTIOD_TLS_LIFETIME,
            now,
        )
        .map_err(|e| crate::ca::Error::Inconsistent(e.to_string()))?;
        let entry = state.clusters.entry(name.clone()).or_default();
        entry.istiod_tls = Some(crate::state::ServingRecord {
            cert_pem: s.chain_pem,
            key_pem: crate::secret::SecretString::new(s.key.to_pkcs8_pem()),
            not_before: s.not_before,
            not_after: s.not_after,
        });
        tracing::info!(cluster = %name, "issued istiod serving certificate");
    }
    Ok(due)
}
