//! Path validation over DER certificates: the checks Go's `x509.Verify` makes that matter for
//! Istio (names chain, signatures verify, every cert is within validity, issuers are CAs with
//! keyCertSign, pathLen holds), as a pure function of the certificates and `now`.

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Error;
use super::cert::CertInfo;

/// Verifies `chain` (leaf or signing cert first, then its issuers in order) up to one of
/// `roots`. A root may also appear at the end of `chain`. Returns the index in `roots` of the
/// anchor the path ends at.
pub fn verify(chain: &[Vec<u8>], roots: &[Vec<u8>], now: OffsetDateTime) -> Result<usize, Error> {
    if chain.is_empty() {
        return Err(Error::Chain("empty chain".into()));
    }
    if roots.is_empty() {
        return Err(Error::Chain("no trusted roots".into()));
    }
    let mut parsed_chain = Vec::with_capacity(chain.len());
    for der in chain {
        parsed_chain.push(parse(der)?);
    }
    let mut parsed_roots = Vec::with_capacity(roots.len());
    for der in roots {
        parsed_roots.push(parse(der)?);
    }

    let mut idx = 0;
    loop {
        let (cur_info, cur) = &parsed_chain[idx];
        check_validity(cur_info, now)?;
        if let Some(pos) = roots.iter().position(|r| *r == cur_info.der) {
            return Ok(pos);
        }
        // Can a trusted root sign it directly?
        for (ri, (root_info, root)) in parsed_roots.iter().enumerate() {
            if root_info.subject_raw == cur_info.issuer_raw
                && cur.verify_signature(Some(root.public_key())).is_ok()
            {
                check_validity(root_info, now)?;
                check_issuer(root_info, idx)?;
                return Ok(ri);
            }
        }
        let Some((next_info, next)) = parsed_chain.get(idx + 1) else {
            return Err(Error::Chain(format!(
                "no trusted root issued \"{}\" (issuer \"{}\")",
                cur_info.subject, cur_info.issuer
            )));
        };
        if next_info.subject_raw != cur_info.issuer_raw {
            return Err(Error::Chain(format!(
                "chain is out of order: \"{}\" is not the issuer of \"{}\"",
                next_info.subject, cur_info.subject
            )));
        }
        cur.verify_signature(Some(next.public_key())).map_err(|_| {
            Error::Chain(format!(
                "signature of \"{}\" does not verify with the key of \"{}\"",
                cur_info.subject, next_info.subject
            ))
        })?;
        check_issuer(next_info, idx)?;
        idx += 1;
        if idx > 8 {
            return Err(Error::Chain("chain longer than 8 certificates".into()));
        }
    }
}

fn parse(der: &[u8]) -> Result<(CertInfo, X509Certificate<'_>), Error> {
    let info = CertInfo::from_der(der)?;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    Ok((info, cert))
}

fn check_validity(info: &CertInfo, now: OffsetDateTime) -> Result<(), Error> {
    if now < info.not_before {
        return Err(Error::Chain(format!(
            "\"{}\" is not valid before {}",
            name(info),
            info.not_before
        )));
    }
    if now > info.not_after {
        return Err(Error::Chain(format!(
            "\"{}\" expired at {}",
            name(info),
            info.not_after
        )));
    }
    Ok(())
}

/// `below` is the number of certificates under the issuer in the path, the leaf included.
fn check_issuer(info: &CertInfo, below: usize) -> Result<(), Error> {
    let Some(path_len) = info.ca else {
        return Err(Error::Chain(format!(
            "\"{}\" is not a CA but issued a certificate",
            name(info)
        )));
    };
    if !info.key_cert_sign {
        return Err(Error::Chain(format!(
            "\"{}\" lacks keyCertSign",
            name(info)
        )));
    }
    // Intermediate CAs between this issuer and the leaf.
    if let Some(max) = path_len
        && below as u64 > u64::from(max)
    {
        return Err(Error::Chain(format!(
            "\"{}\" allows pathLen {max} but {below} CA certificates follow it",
            name(info)
        )));
    }
    Ok(())
}

fn name(info: &CertInfo) -> &str {
    if info.subject.is_empty() {
        "(empty subject)"
    } else {
        &info.subject
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use time::Duration;
    use time::macros::datetime;

    use super::*;
    use crate::pki::key::{KeyAlgorithm, SecretKey};
    use crate::pki::spiffe::SpiffeId;
    use crate::pki::template::*;

    const NOW: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    struct Pki {
        root: Vec<u8>,
        int: Vec<u8>,
        leaf: Vec<u8>,
    }

    fn pki(cn: &str) -> Pki {
        let rng = SystemRandom::new();
        let rk = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let root = self_sign_root(
            &RootSpec {
                organization: "o".into(),
                common_name: cn.into(),
                now: NOW,
                lifetime: Duration::days(100),
            },
            &rk,
            &rng,
        )
        .unwrap();
        let rs = CaSigner::new(&root, rk).unwrap();
        let ik = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let int = sign_intermediate(
            &IntermediateSpec {
                organization: "o".into(),
                cluster: "c".into(),
                common_name: format!("{cn} int"),
                now: NOW,
                lifetime: Duration::days(10),
                uri_name_constraint: None,
            },
            &ik.public_key_spki(),
            &rs,
            &rng,
        )
        .unwrap();
        let is = CaSigner::new(&int, ik).unwrap();
        let lk = SecretKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let leaf = sign_leaf(
            &LeafSpec {
                identity: SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap(),
                now: NOW,
                ttl: Duration::hours(1),
                rsa_key: false,
            },
            &lk.public_key_spki(),
            &is,
            &rng,
        )
        .unwrap();
        Pki { root, int, leaf }
    }

    #[test]
    fn accepts_good_paths() {
        let p = pki("r1");
        let q = pki("r2");
        let roots = vec![q.root.clone(), p.root.clone()];
        assert_eq!(
            verify(&[p.leaf.clone(), p.int.clone()], &roots, NOW).unwrap(),
            1
        );
        // With the root repeated at the end of the chain, as cert-chain.pem has it.
        assert_eq!(
            verify(&[p.int.clone(), p.root.clone()], &roots, NOW).unwrap(),
            1
        );
    }

    #[test]
    fn rejects_bad_paths() {
        let p = pki("r1");
        let q = pki("r2");
        let err = |r: Result<usize, Error>| match r {
            Err(Error::Chain(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = err(verify(
            &[p.leaf.clone(), p.int.clone()],
            std::slice::from_ref(&q.root),
            NOW,
        ));
        assert!(m.contains("no trusted root issued"), "{m}");
        let m = err(verify(
            &[p.leaf.clone(), p.int.clone()],
            std::slice::from_ref(&p.root),
            NOW + Duration::days(11),
        ));
        assert!(m.contains("expired"), "{m}");
        let m = err(verify(
            &[p.leaf.clone(), q.int.clone()],
            std::slice::from_ref(&p.root),
            NOW,
        ));
        assert!(m.contains("out of order"), "{m}");
    }
}
