//! Root authorities: where the mesh root's key lives and how intermediates get signed by it.
//!
//! The trait is narrow on purpose: creating a root and signing an intermediate are the only
//! operations that need the root key, and both are rare. Backends that keep the key elsewhere
//! (a Vault PKI mount) return a [`RootRecord`] without a key.

pub mod local;

use time::OffsetDateTime;

use crate::pki::key::KeyAlgorithm;
use crate::pki::template::{IntermediateSpec, RootSpec};
use crate::state::RootRecord;

/// Errors of root backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An X.509 operation failed.
    #[error(transparent)]
    Pki(#[from] crate::pki::Error),
    /// The root record lacks what this backend needs.
    #[error("root {id}: {reason}")]
    Root {
        /// Root id.
        id: String,
        /// Why.
        reason: String,
    },
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

    /// Signs an intermediate for the DER SubjectPublicKeyInfo `spki` with `root`.
    fn sign_intermediate(
        &self,
        root: &RootRecord,
        spec: &IntermediateSpec,
        spki: &[u8],
    ) -> Result<Vec<u8>, Error>;

    /// Cross-signs `subject` (a newer root) with `issuer` (the root it replaces).
    fn cross_sign(
        &self,
        subject: &RootRecord,
        issuer: &RootRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, Error>;
}
