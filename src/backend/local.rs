//! The local root backend: the root key is generated here and kept (0600) in the state store.

use ring::rand::SystemRandom;
use time::OffsetDateTime;

use super::{Error, RootAuthority};
use crate::pki::key::{KeyAlgorithm, SecretKey};
use crate::pki::pem;
use crate::pki::template::{self, CaSigner, IntermediateSpec, RootSpec};
use crate::secret::SecretString;
use crate::state::{RootOrigin, RootRecord, RootStatus};

/// Root key in the state store.
#[derive(Debug)]
pub struct LocalRoot {
    rng: SystemRandom,
}

impl LocalRoot {
    /// A local backend.
    pub fn new() -> Self {
        Self {
            rng: SystemRandom::new(),
        }
    }
}

impl Default for LocalRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl RootAuthority for LocalRoot {
    fn name(&self) -> &'static str {
        "local"
    }

    fn create_root(
        &self,
        id: &str,
        spec: &RootSpec,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
    ) -> Result<RootRecord, Error> {
        let key = SecretKey::generate(algorithm)?;
        let der = template::self_sign_root(spec, &key, &self.rng)?;
        Ok(RootRecord {
            id: id.to_owned(),
            cert_pem: pem::encode_cert(&der),
            key_pem: Some(SecretString::new(key.to_pkcs8_pem())),
            status: RootStatus::Active,
            origin: RootOrigin::Generated,
            created_at: now,
            retired_at: None,
            cross_signed_pem: None,
            backend_ref: None,
            backend_retired: false,
        })
    }

    fn sign_intermediate(
        &self,
        root: &RootRecord,
        spec: &IntermediateSpec,
        key: &SecretKey,
    ) -> Result<Vec<u8>, Error> {
        super::sign_with(&signer(root)?, spec, key, &self.rng)
    }

    fn cross_sign(
        &self,
        subject: &RootRecord,
        issuer: &RootRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, Error> {
        super::cross_sign_with(&signer(issuer)?, subject, now, &self.rng)
    }
}

/// The signer of a root whose key is in the record.
pub(crate) fn signer(root: &RootRecord) -> Result<CaSigner, Error> {
    let key_pem = root.key_pem.as_ref().ok_or_else(|| Error::Root {
        id: root.id.clone(),
        reason: "its key is not in the state store (wrong root backend?)".into(),
    })?;
    let key = SecretKey::from_pem(key_pem.expose())?;
    let cert = pem::certificates(&root.cert_pem)?;
    CaSigner::new(&cert[0], key).map_err(Into::into)
}
