//! A gRPC client of `IstioCertificateService`, for `cactl request` and `cactl bench`.

use rcgen::{CertificateParams, DistinguishedName, DnType, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::grpc::proto::IstioCertificateRequest;
use crate::grpc::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::pki::key::SecretKey;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the CSR failed.
    #[error("CSR: {0}")]
    Csr(String),
    /// Connecting failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Address.
        addr: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The server answered with an error.
    #[error("CreateCertificate failed: {code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// Message.
        message: String,
    },
    /// Bad metadata value.
    #[error("invalid header value for {0}")]
    Header(&'static str),
}

/// A CSR like istio-agent's (`rsa`: subject `O=`) or ztunnel's (empty subject).
pub fn make_csr(key: &SecretKey, identity: &str, agent_style: bool) -> Result<String, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if agent_style {
        dn.push(DnType::OrganizationName, "");
    }
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        identity
            .try_into()
            .map_err(|_| Error::Csr("identity is not IA5".into()))?,
    )];
    let csr = params
        .serialize_request(key)
        .map_err(|e| Error::Csr(e.to_string()))?;
    csr.pem().map_err(|e| Error::Csr(e.to_string()))
}

/// Connects over TLS, verifying the server against `ca_pem` as `server_name`.
pub async fn connect(addr: &str, ca_pem: &str, server_name: &str) -> Result<Channel, Error> {
    crate::tls::install_default_provider();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(server_name);
    let endpoint = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| Error::Csr(format!("address {addr:?}: {e}")))?
        .tls_config(tls)
        .map_err(|source| Error::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    endpoint.connect().await.map_err(|source| Error::Connect {
        addr: addr.to_owned(),
        source,
    })
}

/// Builds a request with the headers istio-agent sends.
pub fn request(
    csr: &str,
    ttl_seconds: i64,
    token: Option<&str>,
    cluster_id: Option<&str>,
) -> Result<tonic::Request<IstioCertificateRequest>, Error> {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "CertSigner".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(String::new())),
        },
    );
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: ttl_seconds,
        metadata: Some(prost_types::Struct { fields }),
    });
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Error::Header("authorization"))?,
        );
    }
    if let Some(c) = cluster_id {
        req.metadata_mut().insert(
            "clusterid",
            c.parse().map_err(|_| Error::Header("clusterid"))?,
        );
    }
    Ok(req)
}

/// Sends one `CreateCertificate` and returns the chain.
pub async fn create_certificate(
    addr: &str,
    ca_pem: &str,
    server_name: &str,
    token: Option<&str>,
    cluster_id: Option<&str>,
    csr: &str,
    ttl_seconds: i64,
) -> Result<Vec<String>, Error> {
    let channel = connect(addr, ca_pem, server_name).await?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let resp = client
        .create_certificate(request(csr, ttl_seconds, token, cluster_id)?)
        .await
        .map_err(|s| Error::Status {
            code: s.code(),
            message: s.message().to_owned(),
        })?;
    Ok(resp.into_inner().cert_chain)
}
