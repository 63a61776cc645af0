//! Certificate signing requests: decoding, self-signature verification, and the facts policy
//! decides on. Only the public key and the names are ever used from a CSR.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::Error;

/// The kind of public key a CSR carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrKey {
    /// RSA with the modulus size in bits.
    Rsa(usize),
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// Anything else (another curve, DSA, ...).
    Other,
}

impl std::fmt::Display for CsrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rsa(bits) => write!(f, "RSA-{bits}"),
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::Ed25519 => f.write_str("Ed25519"),
            Self::Other => f.write_str("unsupported key type"),
        }
    }
}

/// The facts of a CSR whose self-signature has been verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCsr {
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// Key kind.
    pub key: CsrKey,
    /// Raw DER of the subject (see [`ParsedCsr::subject`] for its text).
    pub subject_raw: Vec<u8>,
    /// Number of attribute values in the subject and whether all of them are empty.
    pub subject_attributes: usize,
    /// Whether the subject holds only attributes with empty values (istio-agent's `O=`).
    pub subject_all_empty: bool,
    /// Whether the subject has a common name.
    pub has_common_name: bool,
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP SANs (count is what policy needs; kept as text for messages).
    pub ips: Vec<String>,
    /// e-mail SANs.
    pub emails: Vec<String>,
    /// Other general-name kinds in the SAN (directory names, otherName, ...).
    pub other_names: usize,
    /// Whether the signature uses SHA-1.
    pub sha1_signature: bool,
}

impl ParsedCsr {
    /// The subject in RFC 4514 form (formatted on demand: the signing path never needs it).
    pub fn subject(&self) -> String {
        x509_parser::x509::X509Name::from_der(&self.subject_raw)
            .map(|(_, name)| name.to_string())
            .unwrap_or_default()
    }
}

/// Signature algorithms with SHA-1, by the DER of their OID: sha1WithRSAEncryption
/// (1.2.840.113549.1.1.5), OIW sha1WithRSA (1.3.14.3.2.29), ecdsa-with-SHA1 (1.2.840.10045.4.1).
const SHA1_SIGNATURES: [&[u8]; 3] = [
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05],
    &[0x2b, 0x0e, 0x03, 0x02, 0x1d],
    &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],
];

/// Decodes a DER CSR and verifies its self-signature.
pub fn parse_and_verify(der: &[u8]) -> Result<ParsedCsr, Error> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| Error::Csr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Csr("trailing data after the CSR".into()));
    }
    let sig_alg = &csr.signature_algorithm.algorithm;
    let sha1_signature = SHA1_SIGNATURES.contains(&sig_alg.as_bytes());
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key = if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => CsrKey::Rsa(rsa.key_size()),
            _ => return Err(Error::Csr("malformed RSA public key".into())),
        }
    } else if spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => CsrKey::EcdsaP256,
            Some(c) if c == OID_NIST_EC_P384 => CsrKey::EcdsaP384,
            _ => CsrKey::Other,
        }
    } else if spki.algorithm.algorithm == OID_SIG_ED25519 {
        CsrKey::Ed25519
    } else {
        CsrKey::Other
    };

    // Report a short RSA key as such: the signature check below would only say that it
    // does not verify (ring refuses RSA keys under 2048 bits).
    if let CsrKey::Rsa(bits) = key
        && bits < 2048
    {
        return Err(Error::WeakKey(format!("RSA-{bits}")));
    }
    csr.verify_signature().map_err(|e| match e {
        x509_parser::error::X509Error::SignatureUnsupportedAlgorithm => Error::Csr(format!(
            "unsupported CSR signature algorithm {}",
            sig_alg.to_id_string()
        )),
        _ => Error::CsrSignature,
    })?;

    let mut subject_attributes = 0;
    let mut subject_all_empty = true;
    let mut has_common_name = false;
    for rdn in info.subject.iter() {
        for atv in rdn.iter() {
            subject_attributes += 1;
            if atv.attr_type() == &x509_parser::oid_registry::OID_X509_COMMON_NAME {
                has_common_name = true;
            }
            if !atv.attr_value().data.is_empty() {
                subject_all_empty = false;
            }
        }
    }

    let mut parsed = ParsedCsr {
        spki: spki.raw.to_vec(),
        key,
        subject_raw: info.subject.as_raw().to_vec(),
        subject_attributes,
        subject_all_empty,
        has_common_name,
        uris: Vec::new(),
        dns: Vec::new(),
        ips: Vec::new(),
        emails: Vec::new(),
        other_names: 0,
        sha1_signature,
    };
    for attr in info.iter_attributes() {
        match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(req) => {
                for ext in &req.extensions {
                    match ext.parsed_extension() {
                        ParsedExtension::SubjectAlternativeName(san) => {
                            for name in &san.general_names {
                                match name {
                                    GeneralName::URI(u) => parsed.uris.push((*u).to_owned()),
                                    GeneralName::DNSName(d) => parsed.dns.push((*d).to_owned()),
                                    GeneralName::RFC822Name(e) => {
                                        parsed.emails.push((*e).to_owned());
                                    }
                                    GeneralName::IPAddress(ip) => parsed.ips.push(hex::encode(ip)),
                                    _ => parsed.other_names += 1,
                                }
                            }
                        }
                        ParsedExtension::ParseError { error } => {
                            return Err(Error::Csr(format!(
                                "requested extension {} is malformed: {error}",
                                ext.oid.to_id_string()
                            )));
                        }
                        // Other requested extensions (basicConstraints, keyUsage, ...) are
                        // ignored on purpose: the profile comes from policy, never the CSR.
                        _ => {}
                    }
                }
            }
            ParsedCriAttribute::UnsupportedAttribute | ParsedCriAttribute::ChallengePassword(_) => {
            }
        }
    }
    Ok(parsed)
}

/// Decodes a PEM CSR and verifies its self-signature.
pub fn parse_pem_and_verify(text: &str) -> Result<ParsedCsr, Error> {
    let der = super::pem::csr(text)?;
    parse_and_verify(&der)
}

#[cfg(test)]
pub(crate) mod testing {
    //! CSR builders shaped like the ones istio-agent and ztunnel send.

    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    /// An istio-agent style CSR: subject `O=` (empty), one URI SAN (critical).
    pub fn agent_style(key: &KeyPair, uris: &[&str]) -> String {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "");
        params.distinguished_name = dn;
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    /// A ztunnel style CSR: empty subject, one URI SAN.
    pub fn ztunnel_style(key: &KeyPair, names: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = names;
        params.serialize_request(key).unwrap().pem().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{KeyPair, SanType};

    use super::testing::*;
    use super::*;

    #[test]
    fn parses_agent_csr() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = agent_style(&key, &["spiffe://cluster.local/ns/a/sa/b"]);
        let csr = parse_pem_and_verify(&pem).unwrap();
        assert_eq!(csr.key, CsrKey::EcdsaP256);
        assert_eq!(csr.subject_attributes, 1);
        assert!(csr.subject_all_empty);
        assert_eq!(csr.subject(), "O=");
        assert!(!csr.has_common_name);
        assert_eq!(csr.uris, vec!["spiffe://cluster.local/ns/a/sa/b"]);
        assert_eq!(
            csr.spki,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
    }

    #[test]
    fn parses_ztunnel_csr() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = ztunnel_style(
            &key,
            vec![
                SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap()),
                SanType::DnsName("x.example".try_into().unwrap()),
            ],
        );
        let csr = parse_pem_and_verify(&pem).unwrap();
        assert_eq!(csr.key, CsrKey::EcdsaP384);
        assert_eq!(csr.subject_attributes, 0);
        assert_eq!(csr.subject(), "");
        assert_eq!(csr.dns, vec!["x.example"]);
    }

    #[test]
    fn sha1_signature_oids_are_the_ones_named() {
        let names: Vec<String> = SHA1_SIGNATURES
            .iter()
            .map(|der| x509_parser::der_parser::oid::Oid::new((*der).into()).to_id_string())
            .collect();
        assert_eq!(
            names,
            ["1.2.840.113549.1.1.5", "1.3.14.3.2.29", "1.2.840.10045.4.1"]
        );
    }

    #[test]
    fn tampered_csr_fails_signature() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = agent_style(&key, &["spiffe://cluster.local/ns/a/sa/b"]);
        let mut der = crate::pki::pem::csr(&pem).unwrap();
        // Flip a byte inside the URI (in the signed part).
        let pos = der.windows(6).position(|w| w == b"ns/a/s").unwrap();
        der[pos + 3] = b'z';
        assert!(matches!(parse_and_verify(&der), Err(Error::CsrSignature)));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            parse_and_verify(b"\x30\x03abc"),
            Err(Error::Csr(_))
        ));
        assert!(matches!(
            parse_pem_and_verify("nothing here"),
            Err(Error::MissingBlock { .. })
        ));
    }
}
