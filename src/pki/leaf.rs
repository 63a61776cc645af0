//! Workload leaves encoded from a per-issuer template: the signing service's hot path.
//!
//! Two workload certificates from one issuer differ only in their serial, validity, public key,
//! identity and the subject key identifier derived from that key. Everything else (version,
//! signature algorithm, issuer name, authority key identifier, key usage, extended key usage,
//! basic constraints) is fixed by the issuer, so it is encoded once when the issuer is loaded and
//! copied per request, instead of going through a general certificate builder each time.
//!
//! The encoding is the leaf profile of [`super::template`], byte for byte: the unit tests below
//! encode the same values through rcgen and compare the to-be-signed bytes for every CA key
//! algorithm and both kinds of subject key. The issuer name is copied from the issuer
//! certificate's raw subject, so a leaf's issuer matches its CA's subject exactly, whatever
//! string types that CA used.

use ring::rand::SecureRandom;
use time::OffsetDateTime;

use super::Error;
use super::key::{KeyAlgorithm, SecretKey};

/// `ecdsa-with-SHA256` (1.2.840.10045.4.3.2), as an AlgorithmIdentifier.
const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];
/// `ecdsa-with-SHA384` (1.2.840.10045.4.3.3), as an AlgorithmIdentifier.
const ECDSA_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];
/// `sha256WithRSAEncryption` (1.2.840.113549.1.1.11) with NULL parameters.
const RSA_SHA256: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
];

/// `[0] EXPLICIT INTEGER 2`: X.509 version 3.
const VERSION_3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
/// An empty subject name (the identity is in the critical URI SAN).
const EMPTY_NAME: &[u8] = &[0x30, 0x00];
/// keyUsage, critical: digitalSignature.
const KU_EC: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
];
/// keyUsage, critical: digitalSignature and keyEncipherment (RSA subject keys only).
const KU_RSA: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x05, 0xa0,
];
/// extKeyUsage: serverAuth, clientAuth.
const EKU: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// basicConstraints, critical: CA:FALSE.
const BC_END_ENTITY: &[u8] = &[
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];
/// The start of a subjectKeyIdentifier extension holding a 20-byte key id.
const SKI_PREFIX: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14,
];
/// The OID of subjectAltName followed by `critical: TRUE`.
const SAN_OID_CRITICAL: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11, 0x01, 0x01, 0xff];

/// The bytes of a serial number: positive, exactly 16 bytes in DER.
pub type Serial = [u8; 16];

/// The parts of a workload leaf that one issuer fixes, pre-encoded.
#[derive(Clone, Debug)]
pub struct LeafTemplate {
    /// The signature AlgorithmIdentifier (in the TBS and outside it).
    signature_algorithm: &'static [u8],
    /// AlgorithmIdentifier, issuer Name: what follows the serial in the TBS.
    after_serial: Vec<u8>,
    /// The authorityKeyIdentifier extension.
    aki: Vec<u8>,
}

/// The values of one workload leaf.
#[derive(Clone, Copy, Debug)]
pub struct LeafFields<'a> {
    /// Serial number.
    pub serial: &'a Serial,
    /// Start of validity (whole seconds).
    pub not_before: OffsetDateTime,
    /// End of validity (whole seconds).
    pub not_after: OffsetDateTime,
    /// The subject's SubjectPublicKeyInfo (DER).
    pub spki: &'a [u8],
    /// The SPIFFE URI.
    pub uri: &'a str,
    /// Whether the subject key is RSA (keyEncipherment is set only then).
    pub rsa_key: bool,
}

impl LeafTemplate {
    /// The template of an issuer whose key is `algorithm`, whose certificate's raw subject is
    /// `issuer_name` and whose key identifier (what leaves name as their authority key id) is
    /// `issuer_key_id`.
    pub fn new(
        algorithm: KeyAlgorithm,
        issuer_name: &[u8],
        issuer_key_id: &[u8],
    ) -> Result<Self, Error> {
        let signature_algorithm = match algorithm {
            KeyAlgorithm::EcdsaP256 => ECDSA_SHA256,
            KeyAlgorithm::EcdsaP384 => ECDSA_SHA384,
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa3072 | KeyAlgorithm::Rsa4096 => RSA_SHA256,
        };
        if issuer_key_id.is_empty() || issuer_key_id.len() > 64 {
            return Err(Error::Certificate(format!(
                "issuer key identifier of {} bytes",
                issuer_key_id.len()
            )));
        }
        let mut after_serial = Vec::with_capacity(signature_algorithm.len() + issuer_name.len());
        after_serial.extend_from_slice(signature_algorithm);
        after_serial.extend_from_slice(issuer_name);
        // Extension { extnID authorityKeyIdentifier, extnValue OCTET STRING {
        //   AuthorityKeyIdentifier ::= SEQUENCE { keyIdentifier [0] IMPLICIT OCTET STRING } } }
        let key_id = tlv(0x80, issuer_key_id);
        let value = tlv(0x04, &tlv(0x30, &key_id));
        let mut ext = vec![0x06, 0x03, 0x55, 0x1d, 0x23];
        ext.extend_from_slice(&value);
        Ok(Self {
            signature_algorithm,
            after_serial,
            aki: tlv(0x30, &ext),
        })
    }

    /// The DER TBSCertificate for `fields`.
    pub fn tbs(&self, fields: &LeafFields<'_>) -> Vec<u8> {
        let ski = ring::digest::digest(&ring::digest::SHA256, fields.spki);
        // SAN: Extension { subjectAltName, critical, OCTET STRING { SEQUENCE { [6] uri } } }
        let uri = fields.uri.as_bytes();
        let uri_tlv = tlv_len(uri.len());
        let names_tlv = tlv_len(uri_tlv);
        let san_content = SAN_OID_CRITICAL.len() + tlv_len(names_tlv);
        let ku = if fields.rsa_key { KU_RSA } else { KU_EC };
        let exts_len = self.aki.len()
            + tlv_len(san_content)
            + ku.len()
            + EKU.len()
            + SKI_PREFIX.len()
            + 20
            + BC_END_ENTITY.len();
        let validity_len =
            tlv_len(time_len(fields.not_before)) + tlv_len(time_len(fields.not_after));
        let body_len = VERSION_3.len()
            + tlv_len(fields.serial.len())
            + self.after_serial.len()
            + tlv_len(validity_len)
            + EMPTY_NAME.len()
            + fields.spki.len()
            + tlv_len(tlv_len(exts_len));

        let mut out = Vec::with_capacity(tlv_len(body_len));
        header(&mut out, 0x30, body_len);
        out.extend_from_slice(VERSION_3);
        header(&mut out, 0x02, fields.serial.len());
        out.extend_from_slice(fields.serial);
        out.extend_from_slice(&self.after_serial);
        header(&mut out, 0x30, validity_len);
        time(&mut out, fields.not_before);
        time(&mut out, fields.not_after);
        out.extend_from_slice(EMPTY_NAME);
        out.extend_from_slice(fields.spki);
        header(&mut out, 0xa3, tlv_len(exts_len));
        header(&mut out, 0x30, exts_len);
        out.extend_from_slice(&self.aki);
        header(&mut out, 0x30, san_content);
        out.extend_from_slice(SAN_OID_CRITICAL);
        header(&mut out, 0x04, names_tlv);
        header(&mut out, 0x30, uri_tlv);
        header(&mut out, 0x86, uri.len());
        out.extend_from_slice(uri);
        out.extend_from_slice(ku);
        out.extend_from_slice(EKU);
        out.extend_from_slice(SKI_PREFIX);
        out.extend_from_slice(&ski.as_ref()[..20]);
        out.extend_from_slice(BC_END_ENTITY);
        debug_assert_eq!(out.len(), tlv_len(body_len));
        out
    }

    /// Encodes and signs a leaf: `Certificate ::= SEQUENCE { tbs, algorithm, signature }`.
    pub fn sign(&self, fields: &LeafFields<'_>, key: &SecretKey) -> Result<Vec<u8>, Error> {
        let tbs = self.tbs(fields);
        let signature = rcgen::SigningKey::sign(key, &tbs)?;
        let bits_len = signature.len() + 1;
        let body_len = tbs.len() + self.signature_algorithm.len() + tlv_len(bits_len);
        let mut out = Vec::with_capacity(tlv_len(body_len));
        header(&mut out, 0x30, body_len);
        out.extend_from_slice(&tbs);
        out.extend_from_slice(self.signature_algorithm);
        header(&mut out, 0x03, bits_len);
        out.push(0); // no unused bits
        out.extend_from_slice(&signature);
        Ok(out)
    }
}

/// A fresh serial: 16 random bytes, top bit clear (positive) and first byte non-zero (so the
/// DER INTEGER is exactly 16 bytes).
pub fn random_serial(rng: &dyn SecureRandom) -> Result<Serial, Error> {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes).map_err(|_| Error::Random)?;
    Ok(positive(bytes))
}

/// Makes 16 random bytes a positive 16-byte DER INTEGER.
fn positive(mut bytes: Serial) -> Serial {
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    bytes
}

/// How many serials one draw from the system generator yields.
const SERIAL_BATCH: usize = 64;

/// Serials for the signing path, drawn from the system generator in batches: one system call
/// per [`SERIAL_BATCH`] certificates instead of one each. Every serial is still 120 bits of
/// the system generator's output; none is handed out twice.
pub struct SerialPool {
    rng: ring::rand::SystemRandom,
    batch: std::sync::Mutex<([u8; 16 * SERIAL_BATCH], usize)>,
}

impl std::fmt::Debug for SerialPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPool").finish_non_exhaustive()
    }
}

impl Default for SerialPool {
    fn default() -> Self {
        Self {
            rng: ring::rand::SystemRandom::new(),
            // Starts used up: the first call draws a batch.
            batch: std::sync::Mutex::new(([0; 16 * SERIAL_BATCH], SERIAL_BATCH)),
        }
    }
}

impl SerialPool {
    /// The next serial.
    pub fn next(&self) -> Result<Serial, Error> {
        let mut guard = self.batch.lock().map_err(|_| Error::Random)?;
        let (bytes, used) = &mut *guard;
        if *used >= SERIAL_BATCH {
            self.rng.fill(bytes).map_err(|_| Error::Random)?;
            *used = 0;
        }
        let mut serial = [0u8; 16];
        let start = *used * 16;
        serial.copy_from_slice(bytes.get(start..start + 16).ok_or(Error::Random)?);
        // Forget it here once handed out.
        bytes[start..start + 16].fill(0);
        *used += 1;
        Ok(positive(serial))
    }
}

/// The length of a TLV whose content is `len` bytes long.
fn tlv_len(len: usize) -> usize {
    1 + length_octets(len) + len
}

/// How many octets the DER length of `len` takes.
fn length_octets(len: usize) -> usize {
    if len < 0x80 {
        1
    } else {
        1 + (usize::BITS as usize / 8 - len.leading_zeros() as usize / 8)
    }
}

/// Writes a tag and a definite DER length.
fn header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    if len < 0x80 {
        // Invariant: checked just above, the cast is lossless.
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        // Invariant: at most 8 length octets, so the count fits in the low 7 bits.
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// One DER TLV (definite length) as a new vector.
pub(super) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tlv_len(content.len()));
    header(&mut out, tag, content.len());
    out.extend_from_slice(content);
    out
}

/// The content length of a time: UTCTime from 1950 to 2049, GeneralizedTime otherwise
/// (RFC 5280 4.1.2.5).
fn time_len(t: OffsetDateTime) -> usize {
    if (1950..2050).contains(&t.year()) {
        13
    } else {
        15
    }
}

/// Writes `t` (UTC, whole seconds) as UTCTime or GeneralizedTime.
fn time(out: &mut Vec<u8>, t: OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let utc = (1950..2050).contains(&t.year());
    header(out, if utc { 0x17 } else { 0x18 }, time_len(t));
    let year = t.year();
    if utc {
        two_digits(out, year.rem_euclid(100));
    } else {
        two_digits(out, year.div_euclid(100));
        two_digits(out, year.rem_euclid(100));
    }
    two_digits(out, i32::from(u8::from(t.month())));
    two_digits(out, i32::from(t.day()));
    two_digits(out, i32::from(t.hour()));
    two_digits(out, i32::from(t.minute()));
    two_digits(out, i32::from(t.second()));
    out.push(b'Z');
}

/// Writes `v` (0..=99) as two ASCII digits.
fn two_digits(out: &mut Vec<u8>, v: i32) {
    let v = v.clamp(0, 99);
    // Invariant: 0..=99 after the clamp, so both digits are in 0..=9.
    out.push(b'0' + (v / 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use time::Duration;
    use time::macros::datetime;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::pki::spiffe::SpiffeId;
    use crate::pki::template::{CaSigner, LeafSpec, RootSpec, leaf_params, self_sign_root};

    fn ca(algorithm: KeyAlgorithm, now: OffsetDateTime) -> CaSigner {
        let rng = SystemRandom::new();
        let key = SecretKey::generate(algorithm).unwrap();
        let spec = RootSpec {
            organization: "Example Mesh".into(),
            common_name: format!("template test {algorithm:?}"),
            now,
            lifetime: Duration::days(3650),
        };
        let der = self_sign_root(&spec, &key, &rng).unwrap();
        CaSigner::new(&der, key).unwrap()
    }

    /// The TBS rcgen encodes for the same values, and ours.
    fn both(
        signer: &CaSigner,
        spec: &LeafSpec,
        spki: &[u8],
        serial: &Serial,
    ) -> (Vec<u8>, Vec<u8>) {
        let rng = SystemRandom::new();
        let mut params =
            leaf_params(spec, (signer_not_before(signer), signer.not_after()), &rng).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        let (not_before, not_after) = (params.not_before, params.not_after);
        let rc_spki = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
        let reference = params.signed_by(&rc_spki, signer.issuer()).unwrap();
        let (_, parsed) = X509Certificate::from_der(reference.der()).unwrap();
        let reference_tbs = parsed.tbs_certificate.as_ref().to_vec();
        let uri = spec.identity.to_string();
        let ours = signer.leaf_template().tbs(&LeafFields {
            serial,
            not_before,
            not_after,
            spki,
            uri: &uri,
            rsa_key: spec.rsa_key,
        });
        (reference_tbs, ours)
    }

    fn signer_not_before(signer: &CaSigner) -> OffsetDateTime {
        let (_, c) = X509Certificate::from_der(signer.cert_der()).unwrap();
        c.validity().not_before.to_datetime()
    }

    #[test]
    fn encoding_is_rcgens_for_every_ca_key_and_subject_key() {
        let now = datetime!(2026-03-04 05:06:07.891 UTC);
        let ec = p256_spki();
        let rsa = SecretKey::generate(KeyAlgorithm::Rsa2048)
            .unwrap()
            .public_key_spki();
        let long_ns = "n".repeat(63);
        let long_sa = "s".repeat(120);
        for algorithm in CA_ALGORITHMS {
            let signer = ca(algorithm, now - Duration::days(1));
            for (spki, rsa_key) in [(&ec, false), (&rsa, true)] {
                for (ns, sa) in [("default", "sleep"), (long_ns.as_str(), long_sa.as_str())] {
                    let spec = spec(ns, sa, now, Duration::hours(24), rsa_key);
                    let serial = [0x7f, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff];
                    let (reference, ours) = both(&signer, &spec, spki, &serial);
                    assert_eq!(
                        hex::encode(&ours),
                        hex::encode(&reference),
                        "{algorithm:?}, RSA subject {rsa_key}, {ns}/{sa}"
                    );
                }
            }
        }
    }

    const CA_ALGORITHMS: [KeyAlgorithm; 3] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Rsa2048,
    ];

    fn spec(ns: &str, sa: &str, now: OffsetDateTime, ttl: Duration, rsa_key: bool) -> LeafSpec {
        LeafSpec {
            identity: SpiffeId::new("cluster.local", ns, sa).unwrap(),
            now,
            ttl,
            rsa_key,
        }
    }

    fn p256_spki() -> Vec<u8> {
        SecretKey::generate(KeyAlgorithm::EcdsaP256)
            .unwrap()
            .public_key_spki()
    }

    #[test]
    fn times_from_2050_are_generalized_like_rcgens() {
        // A CA from 2049 and a leaf whose NotAfter crosses into 2050.
        let now = datetime!(2049-12-31 23:30:00 UTC);
        let signer = ca(KeyAlgorithm::EcdsaP256, now - Duration::days(1));
        let spki = p256_spki();
        let spec = spec("default", "sleep", now, Duration::hours(24), false);
        let (reference, ours) = both(&signer, &spec, &spki, &[0x11; 16]);
        assert_eq!(hex::encode(&ours), hex::encode(&reference));
        let text = String::from_utf8_lossy(&ours);
        assert!(text.contains("491231232800Z"), "UTCTime NotBefore");
        assert!(text.contains("20500101233000Z"), "GeneralizedTime NotAfter");
    }

    #[test]
    fn signed_leaf_verifies_under_its_ca_for_every_algorithm() {
        let now = datetime!(2026-03-04 05:06:07 UTC);
        let rng = SystemRandom::new();
        for algorithm in CA_ALGORITHMS {
            let signer = ca(algorithm, now - Duration::days(1));
            let spki = p256_spki();
            let spec = spec("ns1", "sa1", now, Duration::hours(1), false);
            let (der, serial) =
                crate::pki::template::issue_leaf(&spec, &spki, &signer, &rng).unwrap();
            let (rest, leaf) = X509Certificate::from_der(&der).unwrap();
            assert!(rest.is_empty());
            let (_, ca_cert) = X509Certificate::from_der(signer.cert_der()).unwrap();
            leaf.verify_signature(Some(ca_cert.public_key()))
                .unwrap_or_else(|e| panic!("{algorithm:?}: {e}"));
            assert_eq!(leaf.raw_serial(), serial.as_slice());
            assert_eq!(leaf.issuer().as_raw(), ca_cert.subject().as_raw());
            assert_eq!(leaf.public_key().raw, spki.as_slice());
            assert_eq!(
                leaf.validity().not_after.to_datetime(),
                now + Duration::hours(1)
            );
        }
    }

    #[test]
    fn serials_are_positive_sixteen_byte_integers() {
        let rng = SystemRandom::new();
        for _ in 0..256 {
            let s = random_serial(&rng).unwrap();
            assert!(s[0] != 0 && s[0] & 0x80 == 0, "{s:?}");
        }
    }

    #[test]
    fn pooled_serials_are_positive_and_distinct_across_batches() {
        let pool = SerialPool::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(3 * SERIAL_BATCH + 5) {
            let s = pool.next().unwrap();
            assert!(s[0] != 0 && s[0] & 0x80 == 0, "{s:?}");
            assert!(seen.insert(s), "serial handed out twice");
        }
    }

    #[test]
    fn lengths_use_the_fewest_octets() {
        for (len, octets) in [
            (0, 1),
            (0x7f, 1),
            (0x80, 2),
            (0xff, 2),
            (0x100, 3),
            (0xffff, 3),
        ] {
            let mut out = Vec::new();
            header(&mut out, 0x30, len);
            assert_eq!(out.len(), 1 + octets, "{len:#x}");
            assert_eq!(length_octets(len), octets, "{len:#x}");
        }
    }
}
