//! Istio's plug-in CA layout (`cacerts`): rendering the four files and repeating the checks
//! istiod makes when it loads them.

use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::pki::cert::CertInfo;
use crate::pki::key::SecretKey;
use crate::pki::{chain, pem};

/// File names istiod reads from `/etc/cacerts`.
pub const CA_CERT: &str = "ca-cert.pem";
/// Signing key file.
pub const CA_KEY: &str = "ca-key.pem";
/// Chain file.
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Root bundle file.
pub const ROOT_CERT: &str = "root-cert.pem";
/// All four, in the order they are written.
pub const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// The contents of a `cacerts` Secret or directory.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCerts {
    /// The intermediate (PEM).
    pub ca_cert: String,
    /// Its key (PKCS#8 PEM).
    pub ca_key: Zeroizing<String>,
    /// The intermediate, then the certificates above it up to and including its root.
    pub cert_chain: String,
    /// Every root in the current trust bundle.
    pub root_cert: String,
}

impl std::fmt::Debug for CaCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCerts")
            .field("ca_cert", &self.ca_cert)
            .field("ca_key", &"<redacted>")
            .field("cert_chain", &self.cert_chain)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl CaCerts {
    /// The files as (name, contents, mode) triples; the key is 0600, the rest 0644.
    pub fn files(&self) -> [(&'static str, &str, u32); 4] {
        [
            (CA_CERT, self.ca_cert.as_str(), 0o644),
            (CA_KEY, self.ca_key.as_str(), 0o600),
            (CERT_CHAIN, self.cert_chain.as_str(), 0o644),
            (ROOT_CERT, self.root_cert.as_str(), 0o644),
        ]
    }
}

/// The result of one load check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// Short name of the check.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// File contents as read from a directory (`None` = file absent).
#[derive(Clone, Debug, Default)]
pub struct Files {
    /// `ca-cert.pem`.
    pub ca_cert: Option<String>,
    /// `ca-key.pem`.
    pub ca_key: Option<Zeroizing<String>>,
    /// `cert-chain.pem`.
    pub cert_chain: Option<String>,
    /// `root-cert.pem`.
    pub root_cert: Option<String>,
}

/// Runs istiod's plug-in CA load checks over `files` at time `now`, plus cactl's own sanity
/// checks. Every check is reported, in order; later checks that depend on a failed one are
/// reported as failed with the reason.
pub fn check(files: &Files, now: OffsetDateTime) -> Vec<Check> {
    let mut out = Vec::new();
    let mut push = |name, ok, detail: String| out.push(Check { name, ok, detail });

    let missing: Vec<&str> = [
        (CA_CERT, files.ca_cert.is_some()),
        (CA_KEY, files.ca_key.is_some()),
        (CERT_CHAIN, files.cert_chain.is_some()),
        (ROOT_CERT, files.root_cert.is_some()),
    ]
    .iter()
    .filter(|(_, present)| !present)
    .map(|(n, _)| *n)
    .collect();
    push(
        "all four files present",
        missing.is_empty(),
        if missing.is_empty() {
            FILES.join(", ")
        } else {
            format!(
                "missing: {} (istiod >= 1.27 refuses to start)",
                missing.join(", ")
            )
        },
    );

    let signing = files
        .ca_cert
        .as_deref()
        .map(|t| pem::certificates(t).and_then(|c| CertInfo::from_der(&c[0])));
    let signing = match signing {
        Some(Ok(info)) => {
            push(
                "ca-cert.pem parses",
                true,
                format!("{} (serial {})", info.subject, info.serial_hex),
            );
            Some(info)
        }
        Some(Err(e)) => {
            push("ca-cert.pem parses", false, e.to_string());
            None
        }
        None => {
            push("ca-cert.pem parses", false, "file missing".into());
            None
        }
    };

    let key = match files.ca_key.as_deref().map(|t| SecretKey::from_pem(t)) {
        Some(Ok(k)) => {
            push("ca-key.pem parses", true, k.algorithm().to_string());
            Some(k)
        }
        Some(Err(e)) => {
            push("ca-key.pem parses", false, e.to_string());
            None
        }
        None => {
            push("ca-key.pem parses", false, "file missing".into());
            None
        }
    };

    match (&signing, &key) {
        (Some(s), Some(k)) => {
            let ok = s.spki == k.public_key_spki();
            push(
                "key matches ca-cert.pem",
                ok,
                if ok {
                    "public keys are equal".into()
                } else {
                    "ca-key.pem is not the key of ca-cert.pem".into()
                },
            );
        }
        _ => push(
            "key matches ca-cert.pem",
            false,
            "cannot compare: certificate or key unreadable".into(),
        ),
    }

    match &signing {
        Some(s) => push(
            "signing cert is a CA",
            s.is_ca() && s.key_cert_sign,
            match (s.is_ca(), s.key_cert_sign) {
                (true, true) => "basicConstraints CA:TRUE, keyCertSign".into(),
                (false, _) => "basicConstraints CA:TRUE missing: certificate is not authorized to sign other certificates".into(),
                (true, false) => "keyUsage lacks keyCertSign".into(),
            },
        ),
        None => push("signing cert is a CA", false, "ca-cert.pem unreadable".into()),
    }

    let chain_certs = match files.cert_chain.as_deref() {
        Some(t) if t.trim().is_empty() => {
            push("cert-chain.pem parses", true, "empty (allowed)".into());
            Some(Vec::new())
        }
        Some(t) => match pem::certificates(t) {
            Ok(c) => {
                push(
                    "cert-chain.pem parses",
                    true,
                    format!("{} certificate(s)", c.len()),
                );
                Some(c)
            }
            Err(e) => {
                push("cert-chain.pem parses", false, e.to_string());
                None
            }
        },
        None => {
            push("cert-chain.pem parses", false, "file missing".into());
            None
        }
    };

    let roots = match files.root_cert.as_deref().map(pem::certificates) {
        Some(Ok(r)) => {
            push("root-cert.pem parses", true, format!("{} root(s)", r.len()));
            Some(r)
        }
        Some(Err(e)) => {
            push("root-cert.pem parses", false, e.to_string());
            None
        }
        None => {
            push("root-cert.pem parses", false, "file missing".into());
            None
        }
    };

    match (&signing, &chain_certs, &roots) {
        (Some(s), Some(c), Some(r)) => {
            let mut path = vec![s.der.clone()];
            path.extend(c.iter().filter(|d| **d != s.der).cloned());
            match chain::verify(&path, r, now) {
                Ok(i) => push(
                    "chain verifies to root-cert.pem",
                    true,
                    format!("anchored at root #{} of {}", i + 1, r.len()),
                ),
                Err(e) => push("chain verifies to root-cert.pem", false, e.to_string()),
            }
        }
        _ => push(
            "chain verifies to root-cert.pem",
            false,
            "cannot verify: a file is missing or unreadable".into(),
        ),
    }

    // cactl's own checks beyond istiod's.
    if let (Some(s), Some(c)) = (&signing, &chain_certs) {
        let ok = c.is_empty() || c[0] == s.der;
        push(
            "cert-chain.pem starts with ca-cert.pem",
            ok,
            if ok {
                "yes".into()
            } else {
                "cert-chain.pem must list the signing cert first, then its issuers".into()
            },
        );
    }
    if let Some(s) = &signing {
        let days = s.days_left(now);
        push(
            "signing cert not expired",
            days >= 0 && now >= s.not_before,
            format!(
                "not after {} ({days} days left)",
                s.not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_reported_by_name() {
        let checks = check(&Files::default(), OffsetDateTime::UNIX_EPOCH);
        assert!(!checks[0].ok);
        assert_eq!(
            checks[0].detail,
            "missing: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem (istiod >= 1.27 refuses to start)"
        );
        assert!(checks.iter().all(|c| !c.ok));
    }
}
