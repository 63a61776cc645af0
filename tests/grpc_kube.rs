//! The signing service with clusters reached through the Kubernetes API stand-in: JWKS fetched
//! from the cluster, TokenReview as a fallback, and node authorization for ztunnel
//! impersonation from a watched pod index.

mod common;

use cactl::grpc::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use common::kube_standin::StandIn;
use common::{Env, Server, csr_agent};
use tonic::Code;

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

async fn call(
    c: &mut IstioCertificateServiceClient<tonic::transport::Channel>,
    identity: &str,
    token: &str,
    cluster: &str,
    impersonate: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = cactl::client::request(
        &csr_agent(identity, &rcgen::PKCS_ECDSA_P256_SHA256),
        0,
        Some(token),
        Some(cluster),
    )
    .unwrap();
    if let Some(i) = impersonate {
        req.get_mut()
            .metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert(
                "ImpersonatedIdentity".into(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(i.into())),
                },
            );
    }
    c.create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[test]
fn jwks_from_cluster_token_review_and_node_authorization() {
    let east = StandIn::start("east");
    let west = StandIn::start("west");
    east.add_pod("istio-system", "ztunnel-a", "ztunnel", "node-a", "Running");
    east.add_pod("istio-system", "ztunnel-b", "ztunnel", "node-b", "Running");
    east.add_pod("shop", "web-1", "web", "node-a", "Running");
    east.add_pod("shop", "db-1", "db", "node-b", "Running");
    east.add_pod("shop", "job-1", "job", "node-a", "Succeeded");
    let env = Env::new();
    east.kubeconfig(&env.path("kube/east.yaml"));
    west.kubeconfig(&env.path("kube/west.yaml"));
    env.write(
        "cactl.yaml",
        format!(
            "serve:\n  dns_names: [cactl.test.svc]\nclusters:\n\
             - name: east\n  kubeconfig: kube/east.yaml\n  auth: {{issuer: \"{}\", jwks_from_cluster: true}}\n\
             - name: west\n  kubeconfig: kube/west.yaml\n  auth: {{issuer: \"{}\", token_review: true}}\n",
            east.issuer, west.issuer
        ),
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    env.ok(&["issue", "west"]);
    let bundle = env.ok(&["bundle"]);
    let server = Server::start(&env, &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = cactl::client::connect(&server.grpc, &bundle, "cactl.test.svc")
            .await
            .unwrap();
        let mut c = IstioCertificateServiceClient::new(ch);

        // JWKS fetched from east's /openid/v1/jwks.
        let web = east.token("shop", "web", Some(("web-1", "node-a")), "istio-ca", 600);
        let chain = call(&mut c, &id("shop", "web"), &web, "east", None)
            .await
            .unwrap();
        assert_eq!(
            cactl::pki::cert::CertInfo::from_pem_first(&chain[0])
                .unwrap()
                .uris,
            vec![id("shop", "web")]
        );
        // A token minted by west's issuer does not verify against east's keys.
        let foreign = west.token("shop", "web", None, "istio-ca", 600);
        assert_eq!(
            call(&mut c, &id("shop", "web"), &foreign, "east", None)
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );

        // West: no local JWKS, TokenReview decides.
        let w = west.token("shop", "cart", None, "istio-ca", 600);
        call(&mut c, &id("shop", "cart"), &w, "west", None)
            .await
            .unwrap();
        let wrong_aud = west.token("shop", "cart", None, "kubernetes", 600);
        assert_eq!(
            call(&mut c, &id("shop", "cart"), &wrong_aud, "west", None)
                .await
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );

        // Node authorization: ztunnel on node-a may get certificates for workloads on node-a.
        let z = east.token(
            "istio-system",
            "ztunnel",
            Some(("ztunnel-a", "node-a")),
            "istio-ca",
            600,
        );
        // The pod index syncs asynchronously after start-up.
        let mut ok = None;
        for _ in 0..50 {
            match call(
                &mut c,
                &id("shop", "web"),
                &z,
                "east",
                Some(&id("shop", "web")),
            )
            .await
            {
                Ok(chain) => {
                    ok = Some(chain);
                    break;
                }
                Err(e) => {
                    eprintln!("impersonation attempt: {e:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
            }
        }
        let chain = ok.expect("impersonation for a pod on the caller's node must succeed");
        assert_eq!(
            cactl::pki::cert::CertInfo::from_pem_first(&chain[0])
                .unwrap()
                .uris,
            vec![id("shop", "web")]
        );
        let err = call(
            &mut c,
            &id("shop", "db"),
            &z,
            "east",
            Some(&id("shop", "db")),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains(
                "no running pod with service account db in namespace shop on node node-a"
            ),
            "{}",
            err.message()
        );
        let err = call(
            &mut c,
            &id("shop", "job"),
            &z,
            "east",
            Some(&id("shop", "job")),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "finished pods do not count"
        );
        // A workload scheduled later is picked up from the watch.
        east.add_pod("shop", "db-2", "db", "node-a", "Running");
        let mut allowed = false;
        for _ in 0..50 {
            if call(
                &mut c,
                &id("shop", "db"),
                &z,
                "east",
                Some(&id("shop", "db")),
            )
            .await
            .is_ok()
            {
                allowed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(
            allowed,
            "a pod added after start-up must be seen through the watch"
        );
        // The web workload itself cannot impersonate.
        let err = call(
            &mut c,
            &id("shop", "db"),
            &web,
            "east",
            Some(&id("shop", "db")),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message()
                .contains("shop/web is not a trusted node account"),
            "{}",
            err.message()
        );
    });
}
