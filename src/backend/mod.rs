//! Root authorities: where the mesh root's key lives and how intermediates get signed by it.
//!
//! The trait is narrow on purpose: creating a root and signing an intermediate are the only
//! operations that need the root key, and both are rare. Backends that keep the key elsewhere
//! (a Vault PKI mount) return a [`RootRecord`] without a key.

pub mod local;

use time::OffsetDateTime;

use crate::pki::key::{KeyAlgorithm, SecretKey};
use crate::pki::template::{IntermediateSpec, RootSpec};
use crate::state::RootRecord;

/// Errors of root backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An X.509 operation failed.
    #[error(transparent)]
    Pki(#[from] crate::pki::Error),
    /// Vault failed.
    #[error(transparent)]
    Vault(#[from] crate::vault::Error),
    /// The root record lacks what this backend needs.
    #[error("root {id}: {reason}")]
    Root {
        /// Root id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Signs an intermediate for `key` with a root whose signer is in memory (the local and
/// vault-kv backends).
pub(crate) fn sign_with(
    signer: &crate::pki::template::CaSigner,
    spec: &IntermediateSpec,
    key: &SecretKey,
    rng: &dyn ring::rand::SecureRandom,
) -> Result<Vec<u8>, Error> {
    Ok(crate::pki::template::sign_intermediate(
        spec,
        &key.public_key_spki(),
        signer,
        rng,
    )?)
}

/// Cross-signs `subject` with a root whose signer is in memory.
pub(crate) fn cross_sign_with(
    signer: &crate::pki::template::CaSigner,
    subject: &RootRecord,
    now: OffsetDateTime,
    rng: &dyn ring::rand::SecureRandom,
) -> Result<Vec<u8>, Error> {
    let der = crate::pki::pem::certificates(&subject.cert_pem)?;
    Ok(crate::pki::template::cross_sign_root(
        &der[0], signer, now, rng,
    )?)
}

/// Opens the root backend `loaded`'s configuration selects.
pub fn open(loaded: &crate::config::Loaded) -> Result<Box<dyn RootAuthority + Send + Sync>, Error> {
    use crate::config::RootBackend;
    let r = &loaded.config.root;
    let vault = || {
        crate::vault::Vault::new(
            &loaded.config.vault,
            &loaded.resolve(std::path::Path::new("")),
        )
    };
    Ok(match r.backend {
        RootBackend::Local => Box::new(local::LocalRoot::new()),
        RootBackend::VaultPki => Box::new(crate::vault::pki::VaultPki::new(
            vault()?,
            &r.pki_mount,
            r.adopt_issuer.clone(),
        )),
        RootBackend::VaultKv => Box::new(crate::vault::kv::VaultKvRoot::new(
            vault()?,
            &r.kv_mount,
            &r.kv_path,
            r.adopt_secret.clone(),
        )),
    })
}

/// A place that holds the mesh root and signs intermediates with it.
pub trait RootAuthority {
    /// Short name for messages (`local`, ...).
    fn name(&self) -> &'static str;

    /// Creates a new root with id `id`.
    fn create_root(
        &self,
        id: &str,
        spec: &RootSpec,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
    ) -> Result<RootRecord, Error>;

    /// A root the backend already holds and `cactl init` should adopt (as `id`) instead of
    /// creating one; `None` when the configuration names none.
    fn existing_root(&self, id: &str, now: OffsetDateTime) -> Result<Option<RootRecord>, Error> {
        let _ = (id, now);
        Ok(None)
    }

    /// Signs an intermediate for `key` (a CSR is made with it where the backend needs one;
    /// otherwise only its public key is used) with `root`.
    fn sign_intermediate(
        &self,
        root: &RootRecord,
        spec: &IntermediateSpec,
        key: &SecretKey,
    ) -> Result<Vec<u8>, Error>;

    /// Whether [`Self::cross_sign`] can work with this backend.
    fn can_cross_sign(&self) -> bool {
        true
    }

    /// Cross-signs `subject` (a newer root) with `issuer` (the root it replaces).
    fn cross_sign(
        &self,
        subject: &RootRecord,
        issuer: &RootRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, Error>;

    /// Takes a retired root's right to issue away where the backend can (idempotent).
    fn retire_root(&self, root: &RootRecord) -> Result<(), Error> {
        let _ = root;
        Ok(())
    }
}
