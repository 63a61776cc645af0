//! SPIFFE identities in the shape Istio uses: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;

use super::Error;

/// A validated Istio workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        validate_trust_domain(trust_domain).map_err(|reason| Error::Spiffe {
            id: id.clone(),
            reason,
        })?;
        for seg in [namespace, service_account] {
            validate_segment(seg).map_err(|reason| Error::Spiffe {
                id: id.clone(),
                reason,
            })?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let err = |reason| Error::Spiffe {
            id: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("scheme must be spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| err("missing path /ns/<namespace>/sa/<service-account>"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Self::new(td, ns, sa).map_err(|_| {
                // Re-derive the precise reason against the original text.
                let reason = validate_trust_domain(td)
                    .and_then(|()| validate_segment(ns))
                    .and_then(|()| validate_segment(sa))
                    .err()
                    .unwrap_or("invalid");
                err(reason)
            }),
            _ => Err(err("path must be /ns/<namespace>/sa/<service-account>")),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Checks a trust domain name per the SPIFFE ID spec: lower-case letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("empty trust domain");
    }
    if td.len() > 255 {
        return Err("trust domain longer than 255 characters");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("trust domain may only hold a-z, 0-9, '.', '-' and '_'");
    }
    Ok(())
}

fn validate_segment(seg: &str) -> Result<(), &'static str> {
    if seg.is_empty() {
        return Err("empty path segment");
    }
    if seg == "." || seg == ".." {
        return Err("dot segments are not allowed");
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("path segments may only hold letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_identity() {
        let id =
            SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
    }

    #[test]
    fn rejects_malformed_identities() {
        for (uri, reason) in [
            (
                "https://cluster.local/ns/a/sa/b",
                "scheme must be spiffe://",
            ),
            (
                "spiffe://cluster.local",
                "missing path /ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://cluster.local/ns/a",
                "path must be /ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                "trust domain may only hold a-z, 0-9, '.', '-' and '_'",
            ),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://td/ns/../sa/b", "dot segments are not allowed"),
            (
                "spiffe://td/ns/a/sa/b?x",
                "path segments may only hold letters, digits, '.', '-' and '_'",
            ),
            ("spiffe://td/ns//sa/b", "empty path segment"),
        ] {
            match SpiffeId::parse(uri) {
                Err(Error::Spiffe { reason: r, .. }) => assert_eq!(r, reason, "{uri}"),
                other => panic!("{uri}: {other:?}"),
            }
        }
    }
}
