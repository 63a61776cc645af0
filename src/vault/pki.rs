//! The `vault-pki` root backend: the mesh root is an issuer in a Vault PKI mount and its key
//! never leaves Vault. cactl makes each intermediate's key itself, sends a CSR to
//! `issuer/<root>/sign-intermediate`, and trusts nothing in the answer until it has checked it
//! (the caller verifies CA flag, pathLen, key and chain; here the issuer must be the pinned
//! root). A root rotation creates a new issuer in the same mount; retiring one leaves it in
//! the mount but takes away its right to issue.

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Vault;
use crate::backend::{Error, RootAuthority};
use crate::pki::cert::CertInfo;
use crate::pki::key::{KeyAlgorithm, SecretKey};
use crate::pki::pem;
use crate::pki::template::{IntermediateSpec, RootSpec};
use crate::state::{RootOrigin, RootRecord, RootStatus};

/// A PKI mount holding the root.
#[derive(Debug)]
pub struct VaultPki {
    vault: Vault,
    mount: String,
    adopt: Option<String>,
}

impl VaultPki {
    /// The backend for PKI mount `mount`; `adopt` names an existing issuer to adopt at init.
    pub fn new(vault: Vault, mount: &str, adopt: Option<String>) -> Self {
        Self {
            vault,
            mount: mount.trim_matches('/').to_owned(),
            adopt,
        }
    }

    fn invalid(&self, path: &str, reason: impl Into<String>) -> Error {
        super::Error::Invalid {
            addr: self.vault.addr().to_owned(),
            path: path.to_owned(),
            reason: reason.into(),
        }
        .into()
    }

    /// Reads issuer `reference`; `None` when the mount has no such issuer (Vault answers
    /// that with a 500 "unable to find PKI issuer", not a 404).
    fn read_issuer(&self, reference: &str) -> Result<Option<Value>, Error> {
        let path = format!("{}/issuer/{reference}", self.mount);
        match self.vault.read(&path) {
            Ok(v) => Ok(v),
            Err(super::Error::Status {
                code: 500, detail, ..
            }) if detail.contains("unable to find PKI issuer") => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn issuer_ref<'a>(&self, root: &'a RootRecord) -> Result<&'a str, Error> {
        root.backend_ref.as_deref().ok_or_else(|| Error::Root {
            id: root.id.clone(),
            reason: "no Vault issuer recorded for it (was it made by another root backend?)".into(),
        })
    }

    /// A root record for the issuer certificate `cert_pem` with id `issuer_id`.
    fn record(
        &self,
        path: &str,
        id: &str,
        cert_pem: &str,
        issuer_id: &str,
        origin: RootOrigin,
        now: OffsetDateTime,
    ) -> Result<RootRecord, Error> {
        let ders = pem::certificates(cert_pem).map_err(|e| self.invalid(path, e.to_string()))?;
        let info = CertInfo::from_der(&ders[0]).map_err(|e| self.invalid(path, e.to_string()))?;
        if !info.is_ca() || !info.key_cert_sign || !info.is_self_issued() {
            return Err(self.invalid(
                path,
                format!(
                    "issuer {issuer_id} is not a self-signed CA with keyCertSign ({})",
                    info.subject
                ),
            ));
        }
        Ok(RootRecord {
            id: id.to_owned(),
            cert_pem: pem::encode_cert(&ders[0]),
            key_pem: None,
            status: RootStatus::Active,
            origin,
            created_at: now,
            retired_at: None,
            cross_signed_pem: None,
            backend_ref: Some(issuer_id.to_owned()),
            backend_retired: false,
        })
    }
}

/// Vault's `key_type` / `key_bits` for an algorithm.
fn key_params(algorithm: KeyAlgorithm) -> (&'static str, u32) {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => ("ec", 256),
        KeyAlgorithm::EcdsaP384 => ("ec", 384),
        KeyAlgorithm::Rsa2048 => ("rsa", 2048),
        KeyAlgorithm::Rsa3072 => ("rsa", 3072),
        KeyAlgorithm::Rsa4096 => ("rsa", 4096),
    }
}

/// The certificates of a `ca_chain` field, which servers send as a list of PEM strings or as
/// one PEM string.
pub fn ca_chain(v: &Value) -> Vec<Vec<u8>> {
    let texts: Vec<&str> = match v {
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        Value::String(s) => vec![s.as_str()],
        _ => Vec::new(),
    };
    texts
        .into_iter()
        .filter_map(|t| pem::certificates(t).ok())
        .flatten()
        .collect()
}

impl RootAuthority for VaultPki {
    fn name(&self) -> &'static str {
        "vault-pki"
    }

    fn existing_root(&self, id: &str, now: OffsetDateTime) -> Result<Option<RootRecord>, Error> {
        let Some(adopt) = &self.adopt else {
            return Ok(None);
        };
        let path = format!("{}/issuer/{adopt}", self.mount);
        let v = self
            .read_issuer(adopt)?
            .ok_or_else(|| self.invalid(&path, format!("no issuer {adopt:?} in the mount")))?;
        let cert = v["data"]["certificate"]
            .as_str()
            .ok_or_else(|| self.invalid(&path, "no certificate"))?;
        let issuer_id = v["data"]["issuer_id"].as_str().unwrap_or(adopt);
        self.record(&path, id, cert, issuer_id, RootOrigin::Imported, now)
            .map(Some)
    }

    fn create_root(
        &self,
        id: &str,
        spec: &RootSpec,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
    ) -> Result<RootRecord, Error> {
        // An issuer with this id exists only if an earlier run created it and died before
        // saving the state: it is ours and unused, so it is taken instead of a second one.
        let named = format!("{}/issuer/{id}", self.mount);
        if let Some(v) = self.read_issuer(id)? {
            let cert = v["data"]["certificate"]
                .as_str()
                .ok_or_else(|| self.invalid(&named, "no certificate"))?;
            let issuer_id = v["data"]["issuer_id"].as_str().unwrap_or(id);
            tracing::info!(root = %id, issuer = %issuer_id, "taking the issuer an interrupted run created");
            return self.record(&named, id, cert, issuer_id, RootOrigin::Generated, now);
        }
        let path = format!("{}/issuers/generate/root/internal", self.mount);
        let (key_type, key_bits) = key_params(algorithm);
        let v = self
            .vault
            .write(
                &path,
                json!({
                    "common_name": spec.common_name,
                    "organization": spec.organization,
                    "ttl": format!("{}s", spec.lifetime.whole_seconds()),
                    "key_type": key_type,
                    "key_bits": key_bits,
                    "issuer_name": id,
                    "key_name": id,
                    "exclude_cn_from_sans": true,
                }),
            )?
            .ok_or_else(|| self.invalid(&path, "empty answer"))?;
        let d = &v["data"];
        if d.get("private_key").is_some_and(|k| !k.is_null()) {
            return Err(self.invalid(
                &path,
                "Vault returned the root's private key; refusing an exported root",
            ));
        }
        let cert = d["certificate"]
            .as_str()
            .ok_or_else(|| self.invalid(&path, "no certificate"))?;
        let issuer_id = d["issuer_id"]
            .as_str()
            .ok_or_else(|| self.invalid(&path, "no issuer_id"))?;
        self.record(&path, id, cert, issuer_id, RootOrigin::Generated, now)
    }

    fn sign_intermediate(
        &self,
        root: &RootRecord,
        spec: &IntermediateSpec,
        key: &SecretKey,
    ) -> Result<Vec<u8>, Error> {
        let issuer = self.issuer_ref(root)?;
        let path = format!("{}/issuer/{issuer}/sign-intermediate", self.mount);
        let csr = crate::pki::template::intermediate_csr(spec, key)?;
        let v = self
            .vault
            .write(
                &path,
                json!({
                    "csr": csr,
                    "common_name": spec.common_name,
                    "organization": spec.organization,
                    "ou": spec.cluster,
                    "ttl": format!("{}s", spec.lifetime.whole_seconds()),
                    "max_path_length": 0,
                    "use_csr_values": false,
                    "exclude_cn_from_sans": true,
                    "format": "pem",
                }),
            )?
            .ok_or_else(|| self.invalid(&path, "empty answer"))?;
        let d = &v["data"];
        let cert = d["certificate"]
            .as_str()
            .ok_or_else(|| self.invalid(&path, "no certificate"))?;
        let der = pem::certificates(cert).map_err(|e| self.invalid(&path, e.to_string()))?;
        // The issuer Vault used must be the pinned root, whichever shape the chain came in.
        let pinned = pem::certificates(&root.cert_pem)?;
        let mut above = ca_chain(&d["ca_chain"]);
        above.extend(ca_chain(&d["issuing_ca"]));
        if !above.iter().any(|c| *c == pinned[0]) {
            return Err(self.invalid(
                &path,
                format!(
                    "the certificate was not issued by the pinned root {} (issuer {issuer})",
                    root.id
                ),
            ));
        }
        if let Some(w) = v["warnings"].as_array().filter(|w| !w.is_empty()) {
            tracing::warn!(warnings = ?w, path = %path, "Vault warned while signing the intermediate");
        }
        Ok(der[0].clone())
    }

    fn can_cross_sign(&self) -> bool {
        false
    }

    fn cross_sign(
        &self,
        subject: &RootRecord,
        _issuer: &RootRecord,
        _now: OffsetDateTime,
    ) -> Result<Vec<u8>, Error> {
        Err(Error::Root {
            id: subject.id.clone(),
            reason: "cross-signing needs the new root's key in a CSR, which a vault-pki root never leaves Vault for; rotate without --cross-sign".into(),
        })
    }

    fn retire_root(&self, root: &RootRecord) -> Result<(), Error> {
        let issuer = self.issuer_ref(root)?;
        let path = format!("{}/issuer/{issuer}", self.mount);
        self.vault
            .patch(&path, json!({"usage": "read-only,crl-signing"}))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str) -> String {
        let key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let spec = RootSpec {
            organization: "o".into(),
            common_name: cn.into(),
            now: OffsetDateTime::now_utc(),
            lifetime: time::Duration::days(1),
        };
        let der =
            crate::pki::template::self_sign_root(&spec, &key, &ring::rand::SystemRandom::new())
                .unwrap();
        pem::encode_cert(&der)
    }

    #[test]
    fn ca_chain_in_both_shapes() {
        let (a, b) = (cert("a"), cert("b"));
        let want = [
            pem::certificates(&a).unwrap(),
            pem::certificates(&b).unwrap(),
        ]
        .concat();
        // A list of PEM strings (current servers).
        assert_eq!(ca_chain(&json!([a.clone(), b.clone()])), want);
        // One PEM string holding every certificate (older servers, `issuing_ca`).
        assert_eq!(ca_chain(&json!(format!("{a}{b}"))), want);
        assert!(ca_chain(&Value::Null).is_empty());
        assert!(ca_chain(&json!(["not pem"])).is_empty());
        assert_eq!(key_params(KeyAlgorithm::EcdsaP384), ("ec", 384));
        assert_eq!(key_params(KeyAlgorithm::Rsa3072), ("rsa", 3072));
    }
}
