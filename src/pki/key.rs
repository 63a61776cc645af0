//! Private keys: generation, import from every PEM form istiod accepts, PKCS#8 export.
//!
//! Key material lives in [`SecretKey`], which zeroizes its serialized form on drop and never
//! shows it through `Debug`.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::Error;

/// The key algorithms cactl can generate for roots and intermediates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 signatures (the default).
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384 signatures.
    #[serde(rename = "ecdsa-p384")]
    EcdsaP384,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072 with PKCS#1 v1.5 SHA-256 signatures.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA 4096 with PKCS#1 v1.5 SHA-256 signatures.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyAlgorithm {
    /// The signature algorithm certificates signed by such a key use.
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// Whether this is an RSA algorithm.
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096)
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A private key that can sign certificates.
pub struct SecretKey {
    inner: rcgen::KeyPair,
    algorithm: KeyAlgorithm,
}

impl SecretKey {
    /// Generates a fresh key.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<Self, Error> {
        let pkcs8: Zeroizing<Vec<u8>> = match algorithm {
            KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
                let inner = rcgen::KeyPair::generate_for(algorithm.signature_algorithm())?;
                return Ok(Self { inner, algorithm });
            }
            KeyAlgorithm::Rsa2048 => rsa_pkcs8(aws_lc_rs::rsa::KeySize::Rsa2048)?,
            KeyAlgorithm::Rsa3072 => rsa_pkcs8(aws_lc_rs::rsa::KeySize::Rsa3072)?,
            KeyAlgorithm::Rsa4096 => rsa_pkcs8(aws_lc_rs::rsa::KeySize::Rsa4096)?,
        };
        Self::from_pkcs8(&pkcs8, algorithm)
    }

    /// Parses the first private-key PEM block of `text`: PKCS#8 (`PRIVATE KEY`), SEC1
    /// (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`), the three forms istiod reads.
    pub fn from_pem(text: &str) -> Result<Self, Error> {
        let blocks = super::pem::parse_all(text)?;
        let block = blocks
            .into_iter()
            .find(|b| {
                matches!(
                    b.tag(),
                    "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" | "ENCRYPTED PRIVATE KEY"
                )
            })
            .ok_or(Error::MissingBlock {
                expected: "PRIVATE KEY",
            })?;
        let der = Zeroizing::new(block.contents().to_vec());
        match block.tag() {
            "ENCRYPTED PRIVATE KEY" => Err(Error::Key(
                "encrypted private keys are not supported (istiod cannot read them either)".into(),
            )),
            "RSA PRIVATE KEY" => {
                let kp = aws_lc_rs::rsa::KeyPair::from_der(&der)
                    .map_err(|e| Error::Key(format!("PKCS#1 RSA key: {e}")))?;
                Self::from_aws_rsa(&kp)
            }
            "EC PRIVATE KEY" => Self::from_ec_der(&der),
            _ => Self::from_pkcs8_any(&der),
        }
    }

    fn from_pkcs8_any(der: &[u8]) -> Result<Self, Error> {
        if let Ok(kp) = aws_lc_rs::rsa::KeyPair::from_pkcs8(der) {
            return Self::from_aws_rsa(&kp);
        }
        Self::from_ec_der(der)
    }

    fn from_ec_der(der: &[u8]) -> Result<Self, Error> {
        use aws_lc_rs::signature::{
            ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
        };
        for (alg, algorithm) in [
            (&ECDSA_P256_SHA256_ASN1_SIGNING, KeyAlgorithm::EcdsaP256),
            (&ECDSA_P384_SHA384_ASN1_SIGNING, KeyAlgorithm::EcdsaP384),
        ] {
            if let Ok(kp) = EcdsaKeyPair::from_private_key_der(alg, der) {
                let doc = kp
                    .to_pkcs8v1()
                    .map_err(|_| Error::Key("cannot re-encode EC key".into()))?;
                let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
                return Self::from_pkcs8(&pkcs8, algorithm);
            }
        }
        Err(Error::Key(
            "not an RSA, ECDSA P-256 or ECDSA P-384 private key".into(),
        ))
    }

    fn from_aws_rsa(kp: &aws_lc_rs::rsa::KeyPair) -> Result<Self, Error> {
        let algorithm = match kp.public_modulus_len() * 8 {
            2048 => KeyAlgorithm::Rsa2048,
            3072 => KeyAlgorithm::Rsa3072,
            4096 => KeyAlgorithm::Rsa4096,
            bits => {
                return Err(Error::UnsupportedAlgorithm(format!(
                    "RSA-{bits} (supported: 2048, 3072, 4096)"
                )));
            }
        };
        let doc = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(kp)
            .map_err(|_| Error::Key("cannot re-encode RSA key".into()))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        Self::from_pkcs8(&pkcs8, algorithm)
    }

    fn from_pkcs8(pkcs8: &[u8], algorithm: KeyAlgorithm) -> Result<Self, Error> {
        let der = PrivatePkcs8KeyDer::from(pkcs8);
        let inner =
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, algorithm.signature_algorithm())
                .map_err(|e| Error::Key(e.to_string()))?;
        Ok(Self { inner, algorithm })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The key as a PKCS#8 `PRIVATE KEY` PEM block.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        let der = Zeroizing::new(self.inner.serialize_der());
        let block = pem::Pem::new("PRIVATE KEY", der.to_vec());
        let text = pem::encode_config(
            &block,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        // `Pem` owns a copy of the DER; wipe it too.
        let mut contents = block.into_contents();
        contents.zeroize();
        Zeroizing::new(text)
    }

    /// The key as PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.inner.serialize_der())
    }

    /// The DER SubjectPublicKeyInfo of the key.
    pub fn public_key_spki(&self) -> Vec<u8> {
        self.inner.subject_public_key_info()
    }
}

fn rsa_pkcs8(size: aws_lc_rs::rsa::KeySize) -> Result<Zeroizing<Vec<u8>>, Error> {
    let kp = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| Error::Random)?;
    let doc = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&kp)
        .map_err(|_| Error::Key("cannot encode RSA key".into()))?;
    Ok(Zeroizing::new(doc.as_ref().to_vec()))
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.inner.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for SecretKey {
    fn der_bytes(&self) -> &[u8] {
        self.inner.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        PublicKeyData::algorithm(&self.inner)
    }
}

impl SigningKey for SecretKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.inner.sign(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pkcs8_pem() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Rsa2048,
        ] {
            let key = SecretKey::generate(alg).unwrap();
            let pem = key.to_pkcs8_pem();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
            let back = SecretKey::from_pem(&pem).unwrap();
            assert_eq!(back.algorithm(), alg);
            assert_eq!(back.public_key_spki(), key.public_key_spki());
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "SecretKey { algorithm: EcdsaP256, .. }");
    }

    #[test]
    fn rejects_garbage_and_encrypted_keys() {
        assert!(matches!(
            SecretKey::from_pem("hello"),
            Err(Error::MissingBlock { .. })
        ));
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(SecretKey::from_pem(enc), Err(Error::Key(_))));
        let bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(SecretKey::from_pem(bad), Err(Error::Key(_))));
    }
}
