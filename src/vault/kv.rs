//! KV v2: the `vault-kv` root backend (root certificate and key in a secret, loaded only to
//! sign and zeroized after) and the `vault-kv` state store (the journal, written with
//! check-and-set so two writers can never both succeed).
//!
//! The journal is one KV version, so a save is atomic, but it is split into fields (`meta`,
//! `roots`, and one `cluster.<name>` per cluster) so that no single value grows with the
//! number of clusters and a reader or an operator can see one cluster without parsing all.

use std::sync::Mutex;

use ring::rand::SystemRandom;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{Error, Vault};
use crate::backend::{self, RootAuthority};
use crate::pki::key::{KeyAlgorithm, SecretKey};
use crate::pki::pem;
use crate::pki::template::{self, CaSigner, IntermediateSpec, RootSpec};
use crate::state::{self, LockGuard, RootOrigin, RootRecord, RootStatus, State, StateStore};

/// Reads a KV v2 secret: its data and version; `None` when absent (or deleted).
pub fn read(vault: &Vault, mount: &str, path: &str) -> Result<Option<(Value, u64)>, Error> {
    let api = format!("{mount}/data/{path}");
    let Some(v) = vault.read(&api)? else {
        return Ok(None);
    };
    let data = v["data"]["data"].clone();
    if data.is_null() {
        return Ok(None);
    }
    let version = v["data"]["metadata"]["version"].as_u64().unwrap_or(0);
    Ok(Some((data, version)))
}

/// Writes a KV v2 secret; with `cas`, only if its current version is `cas` (0: it must not
/// exist). Returns the new version.
pub fn write(
    vault: &Vault,
    mount: &str,
    path: &str,
    data: Value,
    cas: Option<u64>,
) -> Result<u64, Error> {
    let api = format!("{mount}/data/{path}");
    let mut body = json!({ "data": data });
    if let Some(c) = cas {
        body["options"] = json!({ "cas": c });
    }
    let v = vault.write(&api, body)?;
    Ok(v.as_ref()
        .and_then(|v| v["data"]["version"].as_u64())
        .unwrap_or(0))
}

/// Roots kept in KV v2 secrets.
#[derive(Debug)]
pub struct VaultKvRoot {
    vault: Vault,
    mount: String,
    path: String,
    adopt: Option<String>,
    rng: SystemRandom,
}

impl VaultKvRoot {
    /// Roots under `<mount>/<path>/<root id>`; `adopt` names an existing secret to adopt.
    pub fn new(vault: Vault, mount: &str, path: &str, adopt: Option<String>) -> Self {
        Self {
            vault,
            mount: mount.trim_matches('/').to_owned(),
            path: path.trim_matches('/').to_owned(),
            adopt,
            rng: SystemRandom::new(),
        }
    }

    /// The certificate and key of a root, loaded from its secret (the key text is zeroized
    /// when dropped).
    fn load(&self, root: &RootRecord) -> Result<(String, Zeroizing<String>), backend::Error> {
        let path = root
            .backend_ref
            .as_deref()
            .ok_or_else(|| backend::Error::Root {
                id: root.id.clone(),
                reason: "no Vault KV secret recorded for it (was it made by another root backend?)"
                    .into(),
            })?;
        self.load_path(path)
    }

    fn load_path(&self, path: &str) -> Result<(String, Zeroizing<String>), backend::Error> {
        let api = format!("{}/data/{path}", self.mount);
        let invalid = |reason: &str| Error::Invalid {
            addr: self.vault.addr().to_owned(),
            path: api.clone(),
            reason: reason.to_owned(),
        };
        let (data, _) = read(&self.vault, &self.mount, path)?
            .ok_or_else(|| invalid("the root secret does not exist"))?;
        let cert = data["certificate"]
            .as_str()
            .ok_or_else(|| invalid("no certificate field"))?
            .to_owned();
        let key = Zeroizing::new(
            data["private_key"]
                .as_str()
                .ok_or_else(|| invalid("no private_key field"))?
                .to_owned(),
        );
        Ok((cert, key))
    }

    /// A record for the root in the secret at `path`, after the checks of
    /// `cactl init --import-cert/--import-key`.
    fn adopt_path(
        &self,
        id: &str,
        path: &str,
        origin: RootOrigin,
        now: OffsetDateTime,
    ) -> Result<RootRecord, backend::Error> {
        let (cert, key) = self.load_path(path)?;
        let mut scratch = State::new();
        crate::ca::init_imported(&mut scratch, &cert, &key, now).map_err(|e| {
            backend::Error::Root {
                id: id.to_owned(),
                reason: format!("the root in Vault KV {path}: {e}"),
            }
        })?;
        // Invariant: a successful import pushed exactly one root onto the empty scratch state.
        let mut record = scratch.roots.remove(0);
        record.id = id.to_owned();
        record.key_pem = None;
        record.backend_ref = Some(path.to_owned());
        record.origin = origin;
        Ok(record)
    }

    fn signer(&self, root: &RootRecord) -> Result<CaSigner, backend::Error> {
        let (cert, key) = self.load(root)?;
        let key = SecretKey::from_pem(&key)?;
        let der = pem::certificates(&cert)?;
        // The secret must still hold the root the state pinned.
        let pinned = pem::certificates(&root.cert_pem)?;
        if der[0] != pinned[0] {
            return Err(backend::Error::Root {
                id: root.id.clone(),
                reason: "the Vault KV secret holds another certificate than the pinned root".into(),
            });
        }
        Ok(CaSigner::new(&der[0], key)?)
    }
}

impl RootAuthority for VaultKvRoot {
    fn name(&self) -> &'static str {
        "vault-kv"
    }

    fn existing_root(
        &self,
        id: &str,
        now: OffsetDateTime,
    ) -> Result<Option<RootRecord>, backend::Error> {
        let Some(path) = &self.adopt else {
            return Ok(None);
        };
        self.adopt_path(id, path, RootOrigin::Imported, now)
            .map(Some)
    }

    fn create_root(
        &self,
        id: &str,
        spec: &RootSpec,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
    ) -> Result<RootRecord, backend::Error> {
        let path = format!("{}/{id}", self.path);
        // A secret for this id exists only if an earlier run wrote it and died before saving
        // the state: it is ours and unused, so it is taken instead of being overwritten.
        if read(&self.vault, &self.mount, &path)?.is_some() {
            tracing::info!(root = %id, path = %path, "taking the root an interrupted run created");
            return self.adopt_path(id, &path, RootOrigin::Generated, now);
        }
        let key = SecretKey::generate(algorithm)?;
        let der = template::self_sign_root(spec, &key, &self.rng)?;
        let cert_pem = pem::encode_cert(&der);
        let key_pem = Zeroizing::new(key.to_pkcs8_pem());
        // Never overwrite: a root secret is written once.
        write(
            &self.vault,
            &self.mount,
            &path,
            json!({ "certificate": cert_pem, "private_key": key_pem.as_str() }),
            Some(0),
        )?;
        Ok(RootRecord {
            id: id.to_owned(),
            cert_pem,
            key_pem: None,
            status: RootStatus::Active,
            origin: RootOrigin::Generated,
            created_at: now,
            retired_at: None,
            cross_signed_pem: None,
            backend_ref: Some(path),
            backend_retired: false,
        })
    }

    fn sign_intermediate(
        &self,
        root: &RootRecord,
        spec: &IntermediateSpec,
        key: &SecretKey,
    ) -> Result<Vec<u8>, backend::Error> {
        backend::sign_with(&self.signer(root)?, spec, key, &self.rng)
    }

    fn cross_sign(
        &self,
        subject: &RootRecord,
        issuer: &RootRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, backend::Error> {
        backend::cross_sign_with(&self.signer(issuer)?, subject, now, &self.rng)
    }
}

/// The journal in a KV v2 secret.
pub struct VaultKvStore {
    vault: Vault,
    mount: String,
    path: String,
    /// (state revision, KV version) of the last document read or written.
    seen: Mutex<Option<(u64, u64)>>,
}

struct NoLock;
impl LockGuard for NoLock {}

impl VaultKvStore {
    /// The journal at `<mount>/<path>`.
    pub fn new(vault: Vault, mount: &str, path: &str) -> Self {
        Self {
            vault,
            mount: mount.trim_matches('/').to_owned(),
            path: path.trim_matches('/').to_owned(),
            seen: Mutex::new(None),
        }
    }

    fn remote(&self, e: Error) -> state::Error {
        state::Error::Remote {
            location: self.location(),
            reason: e.to_string(),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> state::Error {
        state::Error::Corrupt {
            location: self.location(),
            reason: reason.into(),
        }
    }

    /// The state as KV fields.
    fn split(&self, s: &State) -> Result<Value, state::Error> {
        let Value::Object(mut all) =
            serde_json::to_value(s).map_err(|e| self.corrupt(e.to_string()))?
        else {
            return Err(self.corrupt("state is not an object"));
        };
        let mut fields = Map::new();
        let roots = all.remove("roots").unwrap_or(Value::Array(Vec::new()));
        fields.insert("roots".into(), Value::String(roots.to_string()));
        if let Some(Value::Object(clusters)) = all.remove("clusters") {
            for (name, c) in clusters {
                fields.insert(format!("cluster.{name}"), Value::String(c.to_string()));
            }
        }
        fields.insert("meta".into(), Value::String(Value::Object(all).to_string()));
        Ok(Value::Object(fields))
    }

    /// The state from KV fields.
    fn join(&self, data: &Value) -> Result<State, state::Error> {
        let field = |v: &Value| -> Result<Value, state::Error> {
            serde_json::from_str(
                v.as_str()
                    .ok_or_else(|| self.corrupt("a field is not a string"))?,
            )
            .map_err(|e| self.corrupt(e.to_string()))
        };
        let Value::Object(fields) = data else {
            return Err(self.corrupt("the secret holds no fields"));
        };
        let meta = fields
            .get("meta")
            .ok_or_else(|| self.corrupt("no meta field"))?;
        let Value::Object(mut all) = field(meta)? else {
            return Err(self.corrupt("meta is not an object"));
        };
        if let Some(r) = fields.get("roots") {
            all.insert("roots".into(), field(r)?);
        }
        let mut clusters = Map::new();
        for (k, v) in fields {
            if let Some(name) = k.strip_prefix("cluster.") {
                clusters.insert(name.to_owned(), field(v)?);
            }
        }
        all.insert("clusters".into(), Value::Object(clusters));
        let bytes = Zeroizing::new(Value::Object(all).to_string().into_bytes());
        State::from_json(&bytes, &self.location())
    }
}

impl StateStore for VaultKvStore {
    fn location(&self) -> String {
        format!(
            "Vault {} KV {}/{}",
            self.vault.addr(),
            self.mount,
            self.path
        )
    }

    fn lock(&self) -> Result<Box<dyn LockGuard>, state::Error> {
        // Check-and-set on every save is the guard.
        Ok(Box::new(NoLock))
    }

    fn load(&self) -> Result<Option<State>, state::Error> {
        let Some((data, version)) =
            read(&self.vault, &self.mount, &self.path).map_err(|e| self.remote(e))?
        else {
            return Ok(None);
        };
        let s = self.join(&data)?;
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((s.revision, version));
        }
        Ok(Some(s))
    }

    fn save(&self, s: &State) -> Result<(), state::Error> {
        let conflict = |found: u64| state::Error::Conflict {
            location: self.location(),
            expected: s.revision.saturating_sub(1),
            found,
        };
        let cas = if s.revision <= 1 {
            0
        } else {
            match self.seen.lock().ok().and_then(|x| *x) {
                Some((rev, version)) if rev + 1 == s.revision => version,
                _ => {
                    let Some((data, version)) =
                        read(&self.vault, &self.mount, &self.path).map_err(|e| self.remote(e))?
                    else {
                        return Err(state::Error::NotInitialized(self.location()));
                    };
                    let stored = self.join(&data)?;
                    if stored.revision + 1 != s.revision {
                        return Err(conflict(stored.revision));
                    }
                    version
                }
            }
        };
        let fields = self.split(s)?;
        match write(&self.vault, &self.mount, &self.path, fields, Some(cas)) {
            Ok(version) => {
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = Some((s.revision, version));
                }
                Ok(())
            }
            Err(Error::CasMismatch { .. }) => {
                let found = read(&self.vault, &self.mount, &self.path)
                    .ok()
                    .flatten()
                    .and_then(|(d, _)| self.join(&d).ok())
                    .map_or(0, |st| st.revision);
                if s.revision <= 1 {
                    return Err(state::Error::AlreadyInitialized(self.location()));
                }
                Err(conflict(found))
            }
            Err(e) => Err(self.remote(e)),
        }
    }
}
