//! A parsed summary of a certificate: the fields cactl reports and checks.

use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Error;

/// The facts about a certificate that cactl uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The DER encoding.
    pub der: Vec<u8>,
    /// Serial number, lower-case hex without separators.
    pub serial_hex: String,
    /// Subject in RFC 4514 form.
    pub subject: String,
    /// Issuer in RFC 4514 form.
    pub issuer: String,
    /// Raw DER of the subject name.
    pub subject_raw: Vec<u8>,
    /// Raw DER of the issuer name.
    pub issuer_raw: Vec<u8>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// `Some(path_len)` when basicConstraints says CA:TRUE (`None` inside = unlimited).
    pub ca: Option<Option<u32>>,
    /// Subject key identifier, if present.
    pub ski: Option<Vec<u8>>,
    /// Authority key identifier (key id part), if present.
    pub aki: Option<Vec<u8>>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
    /// DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// Whether the keyUsage extension allows keyCertSign.
    pub key_cert_sign: bool,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(Error::Certificate("trailing data after certificate".into()));
        }
        let mut info = Self {
            der: der.to_vec(),
            serial_hex: hex::encode(cert.raw_serial()),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            subject_raw: cert.subject().as_raw().to_vec(),
            issuer_raw: cert.issuer().as_raw().to_vec(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            ca: None,
            ski: None,
            aki: None,
            uris: Vec::new(),
            dns: Vec::new(),
            sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, der)),
            spki: cert.public_key().raw.to_vec(),
            key_cert_sign: false,
        };
        // Strip the DER sign byte so serials read as the positive number they are.
        if info.serial_hex.len() > 2 && info.serial_hex.starts_with("00") {
            info.serial_hex.drain(..2);
        }
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    info.ca = Some(bc.path_len_constraint);
                }
                ParsedExtension::SubjectKeyIdentifier(k) => info.ski = Some(k.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    info.aki = a.key_identifier.as_ref().map(|k| k.0.to_vec());
                }
                ParsedExtension::KeyUsage(ku) => info.key_cert_sign = ku.key_cert_sign(),
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                            GeneralName::DNSName(d) => info.dns.push((*d).to_owned()),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// Whether this is a CA certificate (basicConstraints CA:TRUE).
    pub fn is_ca(&self) -> bool {
        self.ca.is_some()
    }

    /// Whether subject and issuer are the same name.
    pub fn is_self_issued(&self) -> bool {
        self.subject_raw == self.issuer_raw
    }

    /// Whole days from `now` until NotAfter (negative when expired).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        (self.not_after - now).whole_days()
    }

    /// The PEM encoding.
    pub fn pem(&self) -> String {
        super::pem::encode_cert(&self.der)
    }
}

impl CertInfo {
    /// Parses the first certificate of a PEM text.
    pub fn from_pem_first(text: &str) -> Result<Self, Error> {
        let ders = super::pem::certificates(text)?;
        Self::from_der(&ders[0])
    }
}
