//! Human-readable dumps of certificates and CSRs.

use std::fmt::Write as _;

use x509_parser::prelude::{FromDer, X509Certificate};

use super::Error;
use super::cert::CertInfo;
use super::csr;

/// Describes every certificate and CSR in a PEM text, one paragraph per block.
pub fn describe_pem(text: &str, now: time::OffsetDateTime) -> Result<String, Error> {
    let blocks = super::pem::parse_all(text)?;
    if blocks.is_empty() {
        return Err(Error::MissingBlock {
            expected: "CERTIFICATE or CERTIFICATE REQUEST",
        });
    }
    let mut out = String::new();
    for (i, block) in blocks.iter().enumerate() {
        let _ = writeln!(out, "[{i}] {}", block.tag());
        match block.tag() {
            "CERTIFICATE" => describe_cert(&mut out, block.contents(), now)?,
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => {
                describe_csr(&mut out, block.contents())?;
            }
            tag if tag.contains("PRIVATE KEY") => {
                let _ = writeln!(out, "    (private key: contents not shown)");
            }
            _ => {
                let _ = writeln!(out, "    ({} bytes, not described)", block.contents().len());
            }
        }
    }
    Ok(out)
}

fn describe_cert(out: &mut String, der: &[u8], now: time::OffsetDateTime) -> Result<(), Error> {
    let info = CertInfo::from_der(der)?;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    let _ = writeln!(out, "    subject:    {}", empty_as_dash(&info.subject));
    let _ = writeln!(out, "    issuer:     {}", empty_as_dash(&info.issuer));
    let _ = writeln!(out, "    serial:     {}", info.serial_hex);
    let _ = writeln!(out, "    not before: {}", info.not_before);
    let _ = writeln!(
        out,
        "    not after:  {} ({} days left)",
        info.not_after,
        info.days_left(now)
    );
    let _ = writeln!(
        out,
        "    signature:  {}",
        sig_name(&cert.signature_algorithm.algorithm.to_id_string())
    );
    let _ = writeln!(out, "    key:        {}", key_desc(cert.public_key()));
    match info.ca {
        Some(Some(n)) => {
            let _ = writeln!(out, "    CA:         yes, pathLen {n}");
        }
        Some(None) => {
            let _ = writeln!(out, "    CA:         yes, no pathLen");
        }
        None => {
            let _ = writeln!(out, "    CA:         no");
        }
    }
    for ext in cert.extensions() {
        let _ = writeln!(
            out,
            "    ext {}{}: {:?}",
            ext_name(&ext.oid.to_id_string()),
            if ext.critical { " (critical)" } else { "" },
            ext.parsed_extension()
        );
    }
    let _ = writeln!(out, "    sha256:     {}", info.sha256);
    Ok(())
}

fn describe_csr(out: &mut String, der: &[u8]) -> Result<(), Error> {
    let sig = match csr::parse_and_verify(der) {
        Ok(c) => {
            let _ = writeln!(out, "    subject:    {}", empty_as_dash(&c.subject()));
            let _ = writeln!(out, "    key:        {}", c.key);
            for u in &c.uris {
                let _ = writeln!(out, "    URI SAN:    {u}");
            }
            for d in &c.dns {
                let _ = writeln!(out, "    DNS SAN:    {d}");
            }
            for e in &c.emails {
                let _ = writeln!(out, "    email SAN:  {e}");
            }
            for ip in &c.ips {
                let _ = writeln!(out, "    IP SAN:     {ip} (hex)");
            }
            "valid"
        }
        Err(Error::CsrSignature) => "INVALID",
        Err(e) => return Err(e),
    };
    let _ = writeln!(out, "    signature:  {sig}");
    Ok(())
}

fn empty_as_dash(s: &str) -> &str {
    if s.is_empty() { "(empty)" } else { s }
}

fn key_desc(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> String {
    match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(r)) => format!("RSA-{}", r.key_size()),
        Ok(x509_parser::public_key::PublicKey::EC(e)) => format!("ECDSA ({} bits)", e.key_size()),
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

fn sig_name(oid: &str) -> &str {
    match oid {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.3.101.112" => "Ed25519",
        other => other,
    }
}

fn ext_name(oid: &str) -> &str {
    match oid {
        "2.5.29.14" => "subjectKeyIdentifier",
        "2.5.29.15" => "keyUsage",
        "2.5.29.17" => "subjectAltName",
        "2.5.29.19" => "basicConstraints",
        "2.5.29.30" => "nameConstraints",
        "2.5.29.35" => "authorityKeyIdentifier",
        "2.5.29.37" => "extKeyUsage",
        other => other,
    }
}
