//! Workload signing policy, shared by `cactl sign` and the gRPC signing service.
//!
//! The policy decides from a verified CSR and the caller's identity whether a workload
//! certificate may be issued, and for whom and how long. It follows the stricter of Istio's two
//! behaviours (istiod's RA path and istio-csr): the CSR must name exactly one SPIFFE URI in the
//! mesh's trust domain and nothing else, and when the caller's identity is known the URI must
//! be that identity. Everything else in the CSR (subject, requested extensions such as
//! CA:TRUE) is ignored: the leaf profile comes from [`crate::pki::template`] alone.

use time::Duration;

use crate::pki::csr::{CsrKey, ParsedCsr};
use crate::pki::spiffe::SpiffeId;

/// Why a CSR was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// RSA keys below 2048 bits.
    #[error("weak key: {0} (RSA keys need at least 2048 bits)")]
    WeakKey(CsrKey),
    /// A key type cactl does not issue for.
    #[error("unsupported key type in CSR (accepted: RSA >= 2048, ECDSA P-256/P-384, Ed25519)")]
    UnsupportedKey,
    /// SHA-1 signatures.
    #[error("CSR is signed with SHA-1, which is not accepted")]
    WeakSignature,
    /// DNS names.
    #[error("CSR requests DNS names ({0}); workload certificates carry only a SPIFFE URI")]
    DnsSan(String),
    /// IP addresses.
    #[error("CSR requests IP addresses; workload certificates carry only a SPIFFE URI")]
    IpSan,
    /// e-mail addresses.
    #[error("CSR requests e-mail addresses ({0}); workload certificates carry only a SPIFFE URI")]
    EmailSan(String),
    /// Other general-name kinds.
    #[error("CSR requests unsupported subject alternative names")]
    OtherSan,
    /// No URI at all and no caller identity to fall back on.
    #[error("CSR has no SPIFFE URI SAN")]
    MissingIdentity,
    /// More than one URI.
    #[error("CSR requests {0} URIs; exactly one SPIFFE ID is allowed")]
    TooManyUris(usize),
    /// A URI that is not an Istio SPIFFE ID.
    #[error(
        "CSR URI {uri:?} is not a SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>: {reason}"
    )]
    NotSpiffe {
        /// The URI.
        uri: String,
        /// Why.
        reason: String,
    },
    /// A SPIFFE ID of another trust domain.
    #[error("CSR identity {identity} is outside the trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The requested identity.
        identity: String,
        /// The mesh's trust domain.
        trust_domain: String,
    },
    /// The CSR names someone other than the authenticated caller.
    #[error("CSR identity {requested} does not match the caller identity {caller}")]
    IdentityMismatch {
        /// What the CSR asks for.
        requested: String,
        /// Who is asking.
        caller: String,
    },
}

/// The limits that apply to workload certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadPolicy {
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// TTL used when the request gives none (or a non-positive one).
    pub default_ttl: Duration,
    /// Requests above this are clamped to it.
    pub max_ttl: Duration,
}

/// A CSR the policy accepted, reduced to what the leaf profile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approved {
    /// Who the certificate is for.
    pub identity: SpiffeId,
    /// DER SubjectPublicKeyInfo from the CSR.
    pub spki: Vec<u8>,
    /// Whether the key is RSA.
    pub rsa_key: bool,
    /// The TTL to issue with (before capping at the issuer's NotAfter).
    pub ttl: Duration,
    /// Whether the requested TTL was above the maximum and was reduced.
    pub ttl_clamped: bool,
}

impl WorkloadPolicy {
    /// Decides on a verified CSR.
    ///
    /// `requested_ttl` is what the client asked for (`None`, zero or negative: the default).
    /// `caller` is the authenticated identity, when there is one: the CSR's URI must equal it;
    /// a CSR without any URI then gets the caller's identity (istiod's behaviour).
    pub fn evaluate(
        &self,
        csr: &ParsedCsr,
        requested_ttl: Option<Duration>,
        caller: Option<&SpiffeId>,
    ) -> Result<Approved, Error> {
        let rsa_key = match csr.key {
            CsrKey::Rsa(bits) if bits < 2048 => return Err(Error::WeakKey(csr.key)),
            CsrKey::Rsa(_) => true,
            CsrKey::EcdsaP256 | CsrKey::EcdsaP384 | CsrKey::Ed25519 => false,
            CsrKey::Other => return Err(Error::UnsupportedKey),
        };
        if csr.sha1_signature {
            return Err(Error::WeakSignature);
        }
        if !csr.dns.is_empty() {
            return Err(Error::DnsSan(csr.dns.join(", ")));
        }
        if !csr.ips.is_empty() {
            return Err(Error::IpSan);
        }
        if !csr.emails.is_empty() {
            return Err(Error::EmailSan(csr.emails.join(", ")));
        }
        if csr.other_names > 0 {
            return Err(Error::OtherSan);
        }
        let identity = match (csr.uris.as_slice(), caller) {
            ([], Some(caller)) => caller.clone(),
            ([], None) => return Err(Error::MissingIdentity),
            ([uri], _) => SpiffeId::parse(uri).map_err(|e| Error::NotSpiffe {
                uri: uri.clone(),
                reason: match e {
                    crate::pki::Error::Spiffe { reason, .. } => reason.to_owned(),
                    other => other.to_string(),
                },
            })?,
            (uris, _) => return Err(Error::TooManyUris(uris.len())),
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if let Some(caller) = caller
            && *caller != identity
        {
            return Err(Error::IdentityMismatch {
                requested: identity.to_string(),
                caller: caller.to_string(),
            });
        }
        let (ttl, ttl_clamped) = self.ttl(requested_ttl);
        Ok(Approved {
            identity,
            spki: csr.spki.clone(),
            rsa_key,
            ttl,
            ttl_clamped,
        })
    }

    /// The TTL for a request: default when absent or non-positive, clamped to the maximum.
    pub fn ttl(&self, requested: Option<Duration>) -> (Duration, bool) {
        match requested {
            Some(t) if t > self.max_ttl => (self.max_ttl, true),
            Some(t) if t.is_positive() => (t, false),
            _ => (self.default_ttl.min(self.max_ttl), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> WorkloadPolicy {
        WorkloadPolicy {
            trust_domain: "cluster.local".into(),
            default_ttl: Duration::hours(24),
            max_ttl: Duration::hours(48),
        }
    }

    fn csr() -> ParsedCsr {
        ParsedCsr {
            spki: vec![1, 2, 3],
            key: CsrKey::EcdsaP256,
            subject_raw: vec![0x30, 0],
            subject_attributes: 0,
            subject_all_empty: true,
            has_common_name: false,
            uris: vec!["spiffe://cluster.local/ns/a/sa/b".into()],
            dns: vec![],
            ips: vec![],
            emails: vec![],
            other_names: 0,
            sha1_signature: false,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn accepts_agent_and_ztunnel_shapes() {
        let ok = policy().evaluate(&csr(), None, None).unwrap();
        assert_eq!(ok.identity, id("spiffe://cluster.local/ns/a/sa/b"));
        assert_eq!(ok.ttl, Duration::hours(24));
        assert!(!ok.rsa_key && !ok.ttl_clamped);
        assert_eq!(ok.spki, vec![1, 2, 3]);
        let mut rsa = csr();
        rsa.key = CsrKey::Rsa(2048);
        // SEQUENCE { SET { SEQUENCE { organizationName, UTF8String "" } } }: "O="
        rsa.subject_raw = vec![
            0x30, 0x0b, 0x31, 0x09, 0x30, 0x07, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x00,
        ];
        rsa.subject_attributes = 1;
        let ok = policy()
            .evaluate(&rsa, None, Some(&id("spiffe://cluster.local/ns/a/sa/b")))
            .unwrap();
        assert!(ok.rsa_key);
    }

    #[test]
    fn reject_table() {
        let p = policy();
        type Mutation = Box<dyn Fn(&mut ParsedCsr)>;
        let cases: Vec<(Mutation, Error)> = vec![
            (
                Box::new(|c| c.key = CsrKey::Rsa(1024)),
                Error::WeakKey(CsrKey::Rsa(1024)),
            ),
            (Box::new(|c| c.key = CsrKey::Other), Error::UnsupportedKey),
            (Box::new(|c| c.sha1_signature = true), Error::WeakSignature),
            (
                Box::new(|c| c.dns = vec!["a.example".into()]),
                Error::DnsSan("a.example".into()),
            ),
            (Box::new(|c| c.ips = vec!["7f000001".into()]), Error::IpSan),
            (
                Box::new(|c| c.emails = vec!["a@b".into()]),
                Error::EmailSan("a@b".into()),
            ),
            (Box::new(|c| c.other_names = 1), Error::OtherSan),
            (Box::new(|c| c.uris.clear()), Error::MissingIdentity),
            (
                Box::new(|c| c.uris.push("spiffe://cluster.local/ns/x/sa/y".into())),
                Error::TooManyUris(2),
            ),
            (
                Box::new(|c| c.uris = vec!["https://cluster.local/ns/a/sa/b".into()]),
                Error::NotSpiffe {
                    uri: "https://cluster.local/ns/a/sa/b".into(),
                    reason: "scheme must be spiffe://".into(),
                },
            ),
            (
                Box::new(|c| c.uris = vec!["spiffe://evil.example/ns/a/sa/b".into()]),
                Error::ForeignTrustDomain {
                    identity: "spiffe://evil.example/ns/a/sa/b".into(),
                    trust_domain: "cluster.local".into(),
                },
            ),
        ];
        for (mutate, want) in cases {
            let mut c = csr();
            mutate(&mut c);
            assert_eq!(p.evaluate(&c, None, None).unwrap_err(), want);
        }
        assert_eq!(
            p.evaluate(
                &csr(),
                None,
                Some(&id("spiffe://cluster.local/ns/a/sa/other"))
            )
            .unwrap_err(),
            Error::IdentityMismatch {
                requested: "spiffe://cluster.local/ns/a/sa/b".into(),
                caller: "spiffe://cluster.local/ns/a/sa/other".into(),
            }
        );
    }

    #[test]
    fn caller_identity_fills_a_csr_without_uri() {
        let mut c = csr();
        c.uris.clear();
        let caller = id("spiffe://cluster.local/ns/q/sa/r");
        assert_eq!(
            policy().evaluate(&c, None, Some(&caller)).unwrap().identity,
            caller
        );
    }

    #[test]
    fn ttl_defaults_and_clamps() {
        let p = policy();
        assert_eq!(p.ttl(None), (Duration::hours(24), false));
        assert_eq!(p.ttl(Some(Duration::ZERO)), (Duration::hours(24), false));
        assert_eq!(
            p.ttl(Some(Duration::seconds(-5))),
            (Duration::hours(24), false)
        );
        assert_eq!(p.ttl(Some(Duration::hours(1))), (Duration::hours(1), false));
        assert_eq!(
            p.ttl(Some(Duration::hours(48))),
            (Duration::hours(48), false)
        );
        assert_eq!(
            p.ttl(Some(Duration::hours(49))),
            (Duration::hours(48), true)
        );
        let tight = WorkloadPolicy {
            max_ttl: Duration::hours(1),
            ..p
        };
        assert_eq!(tight.ttl(None), (Duration::hours(1), false));
    }
}
