//! Certificate profiles: the mesh root, the per-cluster intermediate and the workload leaf.
//!
//! Every profile is built from scratch out of policy values; nothing is ever copied from a
//! CSR except the public key and the (already authorized) identity. rcgen's defaults that do
//! not fit a CA (a 1975–4096 validity, a serial derived from the key, a placeholder subject,
//! no AKI) are overridden explicitly here.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::Error;
use super::key::SecretKey;
use super::leaf::{LeafFields, LeafTemplate, Serial, tlv};
use super::spiffe::SpiffeId;

/// How far a leaf's NotBefore is moved into the past, to absorb clock skew (istiod: 2 min).
pub const LEAF_BACKDATE: Duration = Duration::minutes(2);

/// How far CA certificates' NotBefore is moved into the past.
pub const CA_BACKDATE: Duration = Duration::hours(1);

/// What a root certificate says about itself.
#[derive(Clone, Debug)]
pub struct RootSpec {
    /// Organisation in the subject.
    pub organization: String,
    /// Common name; must be unique per root (Go's verifier misbehaves on repeated subjects).
    pub common_name: String,
    /// Current time.
    pub now: OffsetDateTime,
    /// Lifetime from `now`.
    pub lifetime: Duration,
}

/// What an intermediate certificate says about itself.
#[derive(Clone, Debug)]
pub struct IntermediateSpec {
    /// Organisation in the subject.
    pub organization: String,
    /// Cluster name, put in the subject as organizational unit.
    pub cluster: String,
    /// Common name; unique per intermediate.
    pub common_name: String,
    /// Current time.
    pub now: OffsetDateTime,
    /// Lifetime from `now`; capped at the issuer's NotAfter.
    pub lifetime: Duration,
    /// If set, a critical name constraint permitting only URIs in this trust domain.
    pub uri_name_constraint: Option<String>,
}

/// A workload certificate to be issued.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// The identity, already authorized.
    pub identity: SpiffeId,
    /// Current time.
    pub now: OffsetDateTime,
    /// Validity from `now`; capped at the issuer's NotAfter.
    pub ttl: Duration,
    /// Whether the subject key is RSA (keyEncipherment is set only then).
    pub rsa_key: bool,
}

/// A CA certificate with its key, ready to sign.
pub struct CaSigner {
    issuer: Issuer<'static, SecretKey>,
    cert_der: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    leaf: LeafTemplate,
}

impl std::fmt::Debug for CaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CaSigner {
    /// Pairs a CA certificate with its key, checking that they match and that the
    /// certificate is a CA.
    pub fn new(cert_der: &[u8], key: SecretKey) -> Result<Self, Error> {
        let info = super::cert::CertInfo::from_der(cert_der)?;
        if info.spki != key.public_key_spki() {
            return Err(Error::KeyMismatch);
        }
        if !info.is_ca() {
            return Err(Error::Certificate(
                "certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        // Leaves name this CA by its subject key identifier, or (as rcgen does for a CA
        // certificate without one) by the first 20 bytes of SHA-256 over its SPKI.
        let key_id = match &info.ski {
            Some(ski) => ski.clone(),
            None => ring::digest::digest(&ring::digest::SHA256, &info.spki).as_ref()[..20].to_vec(),
        };
        let leaf = LeafTemplate::new(key.algorithm(), &info.subject_raw, &key_id)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der), key)?;
        Ok(Self {
            issuer,
            cert_der: cert_der.to_vec(),
            not_before: info.not_before,
            not_after: info.not_after,
            leaf,
        })
    }

    /// The CA certificate's DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate's NotAfter.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The pre-encoded parts of the workload leaves this CA signs.
    pub fn leaf_template(&self) -> &LeafTemplate {
        &self.leaf
    }

    /// The CA as rcgen's issuer (the reference encoder of the profiles).
    pub fn issuer(&self) -> &Issuer<'static, SecretKey> {
        &self.issuer
    }

    /// The signing key.
    pub fn key(&self) -> &SecretKey {
        self.issuer.key()
    }
}

/// Draws a random positive 16-byte serial number.
pub fn random_serial(rng: &dyn SecureRandom) -> Result<SerialNumber, Error> {
    Ok(SerialNumber::from_slice(&super::leaf::random_serial(rng)?))
}

fn strip_nanos(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// digitalSignature, plus keyEncipherment for RSA keys only (RFC 5480 forbids it for EC keys).
fn end_entity_key_usages(rsa_key: bool) -> Vec<KeyUsagePurpose> {
    if rsa_key {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    }
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ]
}

/// Parameters of a self-signed root.
pub fn root_params(spec: &RootSpec, rng: &dyn SecureRandom) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.organization.as_str());
    dn.push(DnType::CommonName, spec.common_name.as_str());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // keyCertSign + cRLSign only: a root signs certificates and CRLs, nothing else.
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = strip_nanos(spec.now - CA_BACKDATE);
    params.not_after = strip_nanos(spec.now + spec.lifetime);
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = false;
    Ok(params)
}

/// Creates a self-signed root certificate (DER).
pub fn self_sign_root(
    spec: &RootSpec,
    key: &SecretKey,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    let params = root_params(spec, rng)?;
    Ok(params.self_signed(key)?.der().to_vec())
}

/// Parameters of a cluster intermediate, before capping to the issuer.
pub fn intermediate_params(
    spec: &IntermediateSpec,
    issuer_not_after: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = intermediate_dn(spec);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = ca_key_usages();
    params.not_before = strip_nanos(spec.now - CA_BACKDATE);
    params.not_after = strip_nanos((spec.now + spec.lifetime).min(issuer_not_after));
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = true;
    if let Some(td) = &spec.uri_name_constraint {
        params
            .custom_extensions
            .push(uri_name_constraint_extension(td));
    }
    Ok(params)
}

/// Signs an intermediate for `subject_spki` (DER SubjectPublicKeyInfo) with `signer`.
pub fn sign_intermediate(
    spec: &IntermediateSpec,
    subject_spki: &[u8],
    signer: &CaSigner,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    let params = intermediate_params(spec, signer.not_after, rng)?;
    if params.not_after <= spec.now {
        return Err(Error::Chain("the root has expired".into()));
    }
    let spki = SubjectPublicKeyInfo::from_der(subject_spki)?;
    Ok(params.signed_by(&spki, &signer.issuer)?.der().to_vec())
}

/// A CSR (PEM) for an intermediate's key with the intermediate's subject, for root backends
/// that sign CSRs (Vault's `sign-intermediate`). The CA decides the profile; the CSR only
/// proves possession of the key.
pub fn intermediate_csr(spec: &IntermediateSpec, key: &SecretKey) -> Result<String, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = intermediate_dn(spec);
    Ok(params.serialize_request(key)?.pem()?)
}

/// O=organisation, OU=cluster, CN=common name.
fn intermediate_dn(spec: &IntermediateSpec) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.organization.as_str());
    dn.push(DnType::OrganizationalUnitName, spec.cluster.as_str());
    dn.push(DnType::CommonName, spec.common_name.as_str());
    dn
}

/// Cross-signs a root: a certificate with `subject_root`'s name and key, issued by `signer`
/// (the root it replaces), valid from `now` until the earlier of the two roots' NotAfter. A
/// chain `leaf → intermediate → cross-signed root` then verifies under the old root too.
pub fn cross_sign_root(
    subject_root: &[u8],
    signer: &CaSigner,
    now: OffsetDateTime,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let info = super::cert::CertInfo::from_der(subject_root)?;
    let (_, cert) =
        X509Certificate::from_der(subject_root).map_err(|e| Error::Certificate(e.to_string()))?;
    let text = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Error::Certificate("root subject lacks O or CN".into()))
    };
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        text(&mut cert.subject().iter_organization())?,
    );
    dn.push(
        DnType::CommonName,
        text(&mut cert.subject().iter_common_name())?,
    );
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = strip_nanos(now - CA_BACKDATE);
    params.not_after = strip_nanos(info.not_after.min(signer.not_after));
    if params.not_after <= now {
        return Err(Error::Chain("a root to cross-sign has expired".into()));
    }
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = true;
    let spki = SubjectPublicKeyInfo::from_der(&info.spki)?;
    let der = params.signed_by(&spki, &signer.issuer)?.der().to_vec();
    // Chains name their issuer by these bytes: the cross-signed copy must carry the same
    // subject and key identifier as the root.
    let made = super::cert::CertInfo::from_der(&der)?;
    if made.subject_raw != info.subject_raw || made.ski != info.ski {
        return Err(Error::Certificate(
            "cannot reproduce the root's subject for cross-signing (the root was not made by cactl)"
                .into(),
        ));
    }
    Ok(der)
}

/// Parameters of a workload leaf.
/// The validity of the leaf nests in `issuer_validity` (NotBefore, NotAfter): the backdate
/// never reaches before the issuer's NotBefore (an intermediate a CA issued seconds ago).
pub fn leaf_params(
    spec: &LeafSpec,
    issuer_validity: (OffsetDateTime, OffsetDateTime),
    rng: &dyn SecureRandom,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    // Empty subject: the identity is in the (then critical) URI SAN.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(spec.identity.to_string().try_into().map_err(
            |_| Error::Generate("identity is not an IA5 string".into()),
        )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = end_entity_key_usages(spec.rsa_key);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    (params.not_before, params.not_after) = leaf_validity(spec, issuer_validity);
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A leaf's validity: backdated for clock skew, `ttl` long, inside the issuer's.
pub fn leaf_validity(
    spec: &LeafSpec,
    issuer_validity: (OffsetDateTime, OffsetDateTime),
) -> (OffsetDateTime, OffsetDateTime) {
    (
        strip_nanos(spec.now - LEAF_BACKDATE).max(issuer_validity.0),
        strip_nanos((spec.now + spec.ttl).min(issuer_validity.1)),
    )
}

/// Signs a workload leaf for `subject_spki` with `signer`.
pub fn sign_leaf(
    spec: &LeafSpec,
    subject_spki: &[u8],
    signer: &CaSigner,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    issue_leaf(spec, subject_spki, signer, rng).map(|(der, _)| der)
}

/// Signs a workload leaf for `subject_spki` with `signer`, returning it with its serial.
///
/// The leaf is encoded from the signer's [`LeafTemplate`] (the profile of [`leaf_params`],
/// byte for byte). Its validity is checked as values before it is encoded: inside the
/// issuer's, and not empty.
pub fn issue_leaf(
    spec: &LeafSpec,
    subject_spki: &[u8],
    signer: &CaSigner,
    rng: &dyn SecureRandom,
) -> Result<(Vec<u8>, Serial), Error> {
    issue_leaf_with_serial(spec, subject_spki, signer, super::leaf::random_serial(rng)?)
}

/// [`issue_leaf`] with a serial drawn by the caller (from a [`super::leaf::SerialPool`]).
pub fn issue_leaf_with_serial(
    spec: &LeafSpec,
    subject_spki: &[u8],
    signer: &CaSigner,
    serial: Serial,
) -> Result<(Vec<u8>, Serial), Error> {
    if signer.not_after <= spec.now {
        return Err(Error::Chain("the issuing CA has expired".into()));
    }
    let (not_before, not_after) = leaf_validity(spec, (signer.not_before, signer.not_after));
    if not_before >= not_after {
        return Err(Error::Chain(format!(
            "the issuing CA is not valid until {}",
            signer.not_before
        )));
    }
    let uri = spec.identity.to_string();
    if !uri.is_ascii() {
        return Err(Error::Generate("identity is not an IA5 string".into()));
    }
    let fields = LeafFields {
        serial: &serial,
        not_before,
        not_after,
        spki: subject_spki,
        uri: &uri,
        rsa_key: spec.rsa_key,
    };
    let der = signer.leaf.sign(&fields, signer.issuer.key())?;
    Ok((der, serial))
}

/// A TLS server certificate for the signing service itself.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Organisation in the subject.
    pub organization: String,
    /// DNS names; the first is also the CN.
    pub dns_names: Vec<String>,
    /// Current time.
    pub now: OffsetDateTime,
    /// Lifetime; capped at the issuer's NotAfter.
    pub lifetime: Duration,
    /// Whether the subject key is RSA.
    pub rsa_key: bool,
}

/// Signs a server certificate (DNS SANs, serverAuth) for `subject_spki`.
pub fn sign_server(
    spec: &ServerSpec,
    subject_spki: &[u8],
    signer: &CaSigner,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, Error> {
    if signer.not_after <= spec.now {
        return Err(Error::Chain("the issuing CA has expired".into()));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.organization.as_str());
    if let Some(first) = spec.dns_names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.subject_alt_names = spec
        .dns_names
        .iter()
        .map(|d| {
            d.as_str()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|_| Error::Generate(format!("{d:?} is not a DNS name")))
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = end_entity_key_usages(spec.rsa_key);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = strip_nanos(spec.now - LEAF_BACKDATE).max(signer.not_before);
    params.not_after = strip_nanos((spec.now + spec.lifetime).min(signer.not_after));
    params.serial_number = Some(random_serial(rng)?);
    params.use_authority_key_identifier_extension = true;
    let spki = SubjectPublicKeyInfo::from_der(subject_spki)?;
    Ok(params.signed_by(&spki, &signer.issuer)?.der().to_vec())
}

/// NameConstraints with one permitted URI subtree (`[6] IA5String` host) for `trust_domain`.
fn uri_name_constraint_extension(trust_domain: &str) -> CustomExtension {
    // NameConstraints ::= SEQUENCE { permittedSubtrees [0] IMPLICIT GeneralSubtrees }
    // GeneralSubtree  ::= SEQUENCE { base GeneralName }   -- minimum 0 (default), no maximum
    // GeneralName     ::= uniformResourceIdentifier [6] IMPLICIT IA5String
    let uri = tlv(0x86, trust_domain.as_bytes());
    let subtree = tlv(0x30, &uri);
    let permitted = tlv(0xa0, &subtree);
    let value = tlv(0x30, &permitted);
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], value);
    ext.set_criticality(true);
    ext
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use time::macros::datetime;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::pki::key::KeyAlgorithm;

    const NOW: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn root() -> (Vec<u8>, CaSigner) {
        let rng = SystemRandom::new();
        let key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let spec = RootSpec {
            organization: "Example Mesh".into(),
            common_name: "cactl root 1".into(),
            now: NOW,
            lifetime: Duration::days(3650),
        };
        let der = self_sign_root(&spec, &key, &rng).unwrap();
        let signer = CaSigner::new(&der, key).unwrap();
        (der, signer)
    }

    fn intermediate(root: &CaSigner, lifetime: Duration, nc: Option<&str>) -> (Vec<u8>, CaSigner) {
        let rng = SystemRandom::new();
        let key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let spec = IntermediateSpec {
            organization: "Example Mesh".into(),
            cluster: "east".into(),
            common_name: "cactl east 1".into(),
            now: NOW,
            lifetime,
            uri_name_constraint: nc.map(str::to_owned),
        };
        let der = sign_intermediate(&spec, &key.public_key_spki(), root, &rng).unwrap();
        let signer = CaSigner::new(&der, key).unwrap();
        (der, signer)
    }

    fn ext<'a>(
        cert: &'a X509Certificate<'a>,
        oid: &str,
    ) -> &'a x509_parser::extensions::X509Extension<'a> {
        cert.extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == oid)
            .unwrap_or_else(|| panic!("extension {oid} missing"))
    }

    #[test]
    fn root_profile() {
        let (der, _) = root();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.version().0, 2);
        assert_eq!(
            cert.subject().to_string(),
            "O=Example Mesh, CN=cactl root 1"
        );
        assert_eq!(cert.subject(), cert.issuer());
        assert_eq!(cert.validity().not_before.to_datetime(), NOW - CA_BACKDATE);
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            NOW + Duration::days(3650)
        );
        assert_eq!(cert.raw_serial().len(), 16);
        assert!(cert.raw_serial()[0] & 0x80 == 0 && cert.raw_serial()[0] != 0);
        let bc = ext(&cert, "2.5.29.19");
        assert!(bc.critical);
        match bc.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                assert!(bc.ca);
                assert_eq!(bc.path_len_constraint, None);
            }
            other => panic!("{other:?}"),
        }
        let ku = ext(&cert, "2.5.29.15");
        assert!(ku.critical);
        match ku.parsed_extension() {
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.key_cert_sign() && ku.crl_sign());
                assert!(!ku.digital_signature() && !ku.key_encipherment());
            }
            other => panic!("{other:?}"),
        }
        assert!(!ext(&cert, "2.5.29.14").critical); // SKI present
        assert!(
            cert.extensions()
                .iter()
                .all(|e| e.oid.to_id_string() != "2.5.29.37")
        );
        assert!(
            cert.extensions()
                .iter()
                .all(|e| e.oid.to_id_string() != "2.5.29.35")
        );
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
    }

    #[test]
    fn intermediate_profile() {
        let (root_der, root_signer) = root();
        let (der, _) = intermediate(&root_signer, Duration::days(365), Some("cluster.local"));
        let root_info = super::super::cert::CertInfo::from_der(&root_der).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.subject().to_string(),
            "O=Example Mesh, OU=east, CN=cactl east 1"
        );
        assert_eq!(cert.issuer().as_raw(), root_info.subject_raw.as_slice());
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            NOW + Duration::days(365)
        );
        let bc = ext(&cert, "2.5.29.19");
        assert!(bc.critical);
        match bc.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                assert!(bc.ca);
                assert_eq!(bc.path_len_constraint, Some(0));
            }
            other => panic!("{other:?}"),
        }
        let ku = ext(&cert, "2.5.29.15");
        assert!(ku.critical);
        match ku.parsed_extension() {
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
                assert!(!ku.key_encipherment());
            }
            other => panic!("{other:?}"),
        }
        match ext(&cert, "2.5.29.35").parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => assert_eq!(
                aki.key_identifier.as_ref().unwrap().0,
                root_info.ski.as_deref().unwrap()
            ),
            other => panic!("{other:?}"),
        }
        let nc = ext(&cert, "2.5.29.30");
        assert!(nc.critical);
        match nc.parsed_extension() {
            ParsedExtension::NameConstraints(nc) => {
                let permitted = nc.permitted_subtrees.as_ref().unwrap();
                assert_eq!(permitted.len(), 1);
                assert_eq!(permitted[0].base, GeneralName::URI("cluster.local"));
                assert!(nc.excluded_subtrees.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(
            cert.extensions()
                .iter()
                .all(|e| e.oid.to_id_string() != "2.5.29.37")
        );
    }

    #[test]
    fn intermediate_never_outlives_root() {
        let (_, root_signer) = root();
        let (der, _) = intermediate(&root_signer, Duration::days(20_000), None);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            root_signer.not_after()
        );
        assert!(
            cert.extensions()
                .iter()
                .all(|e| e.oid.to_id_string() != "2.5.29.30")
        );
    }

    #[test]
    fn leaf_profile_ec_and_rsa() {
        let rng = SystemRandom::new();
        let (_, root_signer) = root();
        let (int_der, int_signer) = intermediate(&root_signer, Duration::days(365), None);
        let int_info = super::super::cert::CertInfo::from_der(&int_der).unwrap();
        for (alg, rsa) in [
            (KeyAlgorithm::EcdsaP256, false),
            (KeyAlgorithm::Rsa2048, true),
        ] {
            let key = SecretKey::generate(alg).unwrap();
            let spec = LeafSpec {
                identity: SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap(),
                now: NOW,
                ttl: Duration::hours(24),
                rsa_key: rsa,
            };
            let der = sign_leaf(&spec, &key.public_key_spki(), &int_signer, &rng).unwrap();
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            assert!(cert.subject().as_raw() == [0x30, 0x00], "empty subject");
            assert_eq!(cert.issuer().as_raw(), int_info.subject_raw.as_slice());
            assert_eq!(
                cert.validity().not_before.to_datetime(),
                NOW - LEAF_BACKDATE
            );
            assert_eq!(
                cert.validity().not_after.to_datetime(),
                NOW + Duration::hours(24)
            );
            assert_eq!(cert.raw_serial().len(), 16);
            assert_eq!(cert.public_key().raw, key.public_key_spki().as_slice());
            let san = ext(&cert, "2.5.29.17");
            assert!(san.critical);
            match san.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(s) => assert_eq!(
                    s.general_names,
                    vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
                ),
                other => panic!("{other:?}"),
            }
            let bc = ext(&cert, "2.5.29.19");
            assert!(bc.critical);
            match bc.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
                other => panic!("{other:?}"),
            }
            let ku = ext(&cert, "2.5.29.15");
            assert!(ku.critical);
            match ku.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ku.digital_signature());
                    assert_eq!(ku.key_encipherment(), rsa);
                    assert!(!ku.key_cert_sign());
                }
                other => panic!("{other:?}"),
            }
            let eku = ext(&cert, "2.5.29.37");
            assert!(!eku.critical);
            match eku.parsed_extension() {
                ParsedExtension::ExtendedKeyUsage(e) => {
                    assert!(e.server_auth && e.client_auth);
                    assert!(!e.any && !e.code_signing && e.other.is_empty());
                }
                other => panic!("{other:?}"),
            }
            match ext(&cert, "2.5.29.35").parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => assert_eq!(
                    aki.key_identifier.as_ref().unwrap().0,
                    int_info.ski.as_deref().unwrap()
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn leaf_capped_at_issuer_and_refused_after_expiry() {
        let rng = SystemRandom::new();
        let (_, root_signer) = root();
        let (_, int_signer) = intermediate(&root_signer, Duration::hours(10), None);
        let key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let mut spec = LeafSpec {
            identity: SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            now: NOW,
            ttl: Duration::hours(24),
            rsa_key: false,
        };
        let der = sign_leaf(&spec, &key.public_key_spki(), &int_signer, &rng).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            NOW + Duration::hours(10)
        );
        spec.now = NOW + Duration::hours(11);
        assert!(matches!(
            sign_leaf(&spec, &key.public_key_spki(), &int_signer, &rng),
            Err(Error::Chain(_))
        ));
    }

    #[test]
    fn serials_are_unique_positive_16_bytes() {
        let rng = SystemRandom::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = random_serial(&rng).unwrap();
            let b = s.to_bytes();
            assert_eq!(b.len(), 16);
            assert!(b[0] != 0 && b[0] & 0x80 == 0);
            assert!(seen.insert(b));
        }
    }

    #[test]
    fn signer_rejects_wrong_key_and_non_ca() {
        let (root_der, _) = root();
        let other = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        assert!(matches!(
            CaSigner::new(&root_der, other),
            Err(Error::KeyMismatch)
        ));
    }

    #[test]
    fn der_lengths() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = vec![0u8; 300];
        let enc = tlv(0x04, &long);
        assert_eq!(&enc[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }
}
