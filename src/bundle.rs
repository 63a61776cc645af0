//! Trust bundle rendering: PEM (for `root-cert.pem` and `istio-ca-root-cert`) and the SPIFFE
//! bundle format (a JWK set with `use: x509-svid` keys carrying `x5c`).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::pki::Error;

/// Concatenates root certificates (DER) into one PEM bundle, in the given order.
pub fn pem(roots: &[Vec<u8>]) -> String {
    crate::pki::pem::encode_certs(roots.iter().map(Vec::as_slice))
}

/// Renders a SPIFFE trust bundle (JWKS) for the roots.
pub fn spiffe_json(
    roots: &[Vec<u8>],
    sequence: u64,
    refresh_hint_secs: u64,
) -> Result<Value, Error> {
    let mut keys = Vec::with_capacity(roots.len());
    for der in roots {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
        let spki = cert.public_key();
        let mut jwk = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)),
                "e": URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)),
            }),
            Ok(PublicKey::EC(point)) => {
                let data = point.data();
                let (crv, len) = match data.len() {
                    65 => ("P-256", 32),
                    97 => ("P-384", 48),
                    _ => {
                        return Err(Error::UnsupportedAlgorithm(
                            "EC key that is not uncompressed P-256/P-384".into(),
                        ));
                    }
                };
                json!({
                    "kty": "EC",
                    "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&data[1..1 + len]),
                    "y": URL_SAFE_NO_PAD.encode(&data[1 + len..]),
                })
            }
            _ => {
                return Err(Error::UnsupportedAlgorithm(
                    "root key is neither RSA nor EC".into(),
                ));
            }
        };
        jwk["use"] = json!("x509-svid");
        jwk["x5c"] = json!([STANDARD.encode(der)]);
        keys.push(jwk);
    }
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    }))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let skip = b.iter().take_while(|x| **x == 0).count();
    &b[skip.min(b.len().saturating_sub(1))..]
}
