//! Bearer-token parsing and verification on arbitrary input: nothing may panic, and no input
//! without a valid signature from the configured key may authenticate.
#![no_main]

use std::sync::{Arc, OnceLock};

use cactl::grpc::authn::{ClusterTokens, JwksSource};
use libfuzzer_sys::fuzz_target;

struct Ctx {
    rt: tokio::runtime::Runtime,
    tokens: ClusterTokens,
}

fn ctx() -> &'static Ctx {
    static CTX: OnceLock<Ctx> = OnceLock::new();
    CTX.get_or_init(|| {
        // A fixed public key (P-256); the fuzzer never has its private key.
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1",
            "x": "N0BQn6EYqqHLMuq8apefTLhAMafQied2HGQ_uirlS88",
            "y": "LcrK6EA-Yq-D_6ieUsLcnUIQFDamgCTWMU72ma7g32I"
        }]}))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tokens = ClusterTokens::new(
            "c",
            "https://issuer.example",
            vec!["istio-ca".into()],
            Some(JwksSource::Static(Arc::new(jwks))),
            None,
            std::time::Duration::from_secs(3600),
            None,
        );
        rt.block_on(tokens.refresh()).unwrap();
        Ctx { rt, tokens }
    })
}

fuzz_target!(|data: &[u8]| {
    let c = ctx();
    let token = String::from_utf8_lossy(data);
    let r = c.rt.block_on(c.tokens.verify(
        &token,
        "cluster.local",
        std::time::Duration::from_secs(60),
    ));
    assert!(
        r.is_err(),
        "a token without the key's signature authenticated: {token:?}"
    );
});
