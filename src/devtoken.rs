//! A local development token issuer, so `cactl serve` on embedded defaults can be tried without
//! a Kubernetes cluster: `cactl dev-token` mints a projected-service-account-style JWT signed by
//! a key kept (0600) in the state directory, and clusters with `auth.dev_issuer: true` trust it.
//! Never enable it for a real mesh.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use time::OffsetDateTime;

use crate::fsutil;
use crate::pki::key::{KeyAlgorithm, SecretKey};

/// The `iss` of development tokens.
pub const ISSUER: &str = "cactl-dev-issuer";
const KEY_FILE: &str = "dev-issuer-key.pem";

/// Errors of the development issuer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Key file I/O.
    #[error("development issuer key {path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Key decoding or signing.
    #[error("development issuer: {0}")]
    Key(String),
}

/// The development issuer's key.
pub struct DevIssuer {
    key: SecretKey,
}

impl DevIssuer {
    /// Loads the key from `state_dir`, creating it on first use.
    pub fn open(state_dir: &Path) -> Result<Self, Error> {
        let path = state_dir.join(KEY_FILE);
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self {
                key: SecretKey::from_pem(&text).map_err(|e| Error::Key(e.to_string()))?,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SecretKey::generate(KeyAlgorithm::EcdsaP256)
                    .map_err(|e| Error::Key(e.to_string()))?;
                fsutil::ensure_dir(state_dir, 0o700).map_err(io)?;
                fsutil::write_atomic(&path, key.to_pkcs8_pem().as_bytes(), 0o600).map_err(io)?;
                Ok(Self { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The key file's path under `state_dir`.
    pub fn key_path(state_dir: &Path) -> PathBuf {
        state_dir.join(KEY_FILE)
    }

    /// Mints a token shaped like a projected service-account token.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        now: OffsetDateTime,
        ttl: time::Duration,
        node: Option<&str>,
    ) -> Result<String, Error> {
        let iat = now.unix_timestamp();
        let mut k8s = json!({
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": "00000000-0000-0000-0000-000000000000"},
        });
        if let Some(n) = node {
            k8s["node"] = json!({"name": n, "uid": "00000000-0000-0000-0000-000000000001"});
        }
        let claims = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience],
            "iat": iat,
            "nbf": iat,
            "exp": iat + ttl.whole_seconds(),
            "kubernetes.io": k8s,
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid());
        let pem = self.key.to_pkcs8_pem();
        let key =
            EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| Error::Key(e.to_string()))?;
        jsonwebtoken::encode(&header, &claims, &key).map_err(|e| Error::Key(e.to_string()))
    }

    /// The key's id: a digest of its public key.
    pub fn kid(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.key.public_key_spki());
        hex::encode(&d.as_ref()[..8])
    }

    /// The JWKS that verifies this issuer's tokens.
    pub fn jwks(&self) -> Result<JwkSet, Error> {
        let spki = self.key.public_key_spki();
        // SPKI of a P-256 key ends with the 65-byte uncompressed point 04||x||y.
        let point = spki
            .get(spki.len().saturating_sub(65)..)
            .filter(|p| p.first() == Some(&4))
            .ok_or_else(|| Error::Key("unexpected public key encoding".into()))?;
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let doc = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid(),
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
        }]});
        serde_json::from_value(doc).map_err(|e| Error::Key(e.to_string()))
    }
}
