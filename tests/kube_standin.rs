//! The Kubernetes API stand-in, checked against what the real `kube` client expects: the
//! semantics cactl relies on must hold here before any cactl test can lean on them.

mod common;

use std::sync::atomic::Ordering;

use common::kube_standin::StandIn;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client(s: &StandIn, dir: &std::path::Path) -> kube::Client {
    let path = s.kubeconfig(&dir.join("kubeconfig"));
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn cm(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()},
        "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
    }))
    .unwrap()
}

#[test]
fn crud_conflicts_selectors_and_errors() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = StandIn::start("alpha");
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let c = client(&s, dir.path()).await;
        let api: Api<ConfigMap> = Api::namespaced(c.clone(), "istio-system");
        // 404
        let err = api.get("nope").await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err:?}");
        // 201 then 409 AlreadyExists
        let created = api.create(&PostParams::default(), &cm("a", &[("app", "x")], &[("k", "v")])).await.unwrap();
        let rv1 = created.metadata.resource_version.clone().unwrap();
        let err = api.create(&PostParams::default(), &cm("a", &[], &[])).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"), "{err:?}");
        // update bumps resourceVersion; a stale one gets 409 Conflict
        let mut next = created.clone();
        next.data.as_mut().unwrap().insert("k".into(), "v2".into());
        let updated = api.replace("a", &PostParams::default(), &next).await.unwrap();
        let rv2 = updated.metadata.resource_version.clone().unwrap();
        assert_ne!(rv1, rv2);
        let err = api.replace("a", &PostParams::default(), &next).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{err:?}");
        // label selectors
        api.create(&PostParams::default(), &cm("b", &[("app", "y")], &[])).await.unwrap();
        let l = api.list(&ListParams::default().labels("app=x")).await.unwrap();
        assert_eq!(l.items.iter().map(|i| i.metadata.name.clone().unwrap()).collect::<Vec<_>>(), vec!["a"]);
        let l = api.list(&ListParams::default().labels("app!=x")).await.unwrap();
        assert_eq!(l.items.len(), 1);
        let l = api.list(&ListParams::default().fields("metadata.name=b")).await.unwrap();
        assert_eq!(l.items.len(), 1);
        // 422 on invalid objects
        let err = api.create(&PostParams::default(), &cm("Bad_Name", &[], &[])).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{err:?}");
        let raw = http::Request::post("/api/v1/namespaces/istio-system/secrets")
            .header("content-type", "application/json")
            .body(br#"{"metadata": {"name": "s"}, "data": {"k": "%%%"}}"#.to_vec())
            .unwrap();
        let err = c.request_text(raw).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{err:?}");
        let secrets: Api<Secret> = Api::namespaced(c.clone(), "istio-system");
        let good: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}, "stringData": null, "data": {"k": "dg=="}})).unwrap();
        let made = secrets.create(&PostParams::default(), &good).await.unwrap();
        assert_eq!(made.data.unwrap()["k"].0, b"v".to_vec());
        // delete, then 404
        api.delete("b", &DeleteParams::default()).await.unwrap();
        let err = api.delete("b", &DeleteParams::default()).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 404), "{err:?}");
        // faults: 5xx and 403 by name
        s.faults.fail_next.store(1, Ordering::SeqCst);
        let err = api.get("a").await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 500), "{err:?}");
        api.get("a").await.unwrap();
        s.forbid("configmaps", "a");
        let err = api.get("a").await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err:?}");
        // coordination.k8s.io Leases: same semantics through the generic store.
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(c.clone(), "cactl-system");
        let lease: Lease = serde_json::from_value(serde_json::json!({"metadata": {"name": "cactl-leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})).unwrap();
        let l1 = leases.create(&PostParams::default(), &lease).await.unwrap();
        let mut l2 = l1.clone();
        l2.spec.as_mut().unwrap().holder_identity = Some("b".into());
        leases.replace("cactl-leader", &PostParams::default(), &l2).await.unwrap();
        let err = leases.replace("cactl-leader", &PostParams::default(), &l2).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 409), "{err:?}");
        // cluster-scoped namespaces
        let ns: Api<Namespace> = Api::all(c.clone());
        ns.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}})).unwrap()).await.unwrap();
        assert_eq!(ns.list(&ListParams::default()).await.unwrap().items.len(), 1);
    });
    assert!(s.writes() >= 5);
}

#[test]
fn watcher_sees_list_then_changes_and_bookmarks() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = StandIn::start("beta");
    s.add_pod("shop", "web-1", "web", "node-a", "Running");
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let c = client(&s, dir.path()).await;
        let api: Api<Pod> = Api::all(c);
        let mut w = kube::runtime::watcher(api, kube::runtime::watcher::Config::default()).boxed();
        let mut seen = Vec::new();
        let mut added_later = false;
        while let Some(ev) = tokio::time::timeout(std::time::Duration::from_secs(10), w.next())
            .await
            .unwrap()
        {
            match ev.unwrap() {
                kube::runtime::watcher::Event::InitApply(p) => {
                    seen.push(format!("init:{}", p.metadata.name.unwrap()))
                }
                kube::runtime::watcher::Event::InitDone => {
                    seen.push("done".into());
                    s.add_pod("shop", "db-1", "db", "node-b", "Running");
                    s.remove("pods", "shop", "web-1");
                    added_later = true;
                }
                kube::runtime::watcher::Event::Apply(p) => {
                    seen.push(format!("apply:{}", p.metadata.name.unwrap()))
                }
                kube::runtime::watcher::Event::Delete(p) => {
                    seen.push(format!("delete:{}", p.metadata.name.unwrap()));
                    break;
                }
                kube::runtime::watcher::Event::Init => {}
            }
        }
        assert!(added_later);
        assert_eq!(
            seen,
            vec!["init:web-1", "done", "apply:db-1", "delete:web-1"]
        );
    });
}

#[test]
fn token_review_and_jwks_and_access_review() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = StandIn::start("gamma");
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let c = client(&s, dir.path()).await;
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let api: Api<TokenReview> = Api::all(c.clone());
        let review = |token: String| TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec!["istio-ca".into()]),
            },
            ..Default::default()
        };
        let ok = api
            .create(
                &PostParams::default(),
                &review(s.token("shop", "web", Some(("web-1", "node-a")), "istio-ca", 600)),
            )
            .await
            .unwrap();
        let st = ok.status.unwrap();
        assert_eq!(st.authenticated, Some(true));
        let user = st.user.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:shop:web")
        );
        assert_eq!(
            user.extra.unwrap()["authentication.kubernetes.io/node-name"],
            vec!["node-a".to_string()]
        );
        let bad = api
            .create(
                &PostParams::default(),
                &review(s.token("shop", "web", None, "kubernetes", 600)),
            )
            .await
            .unwrap();
        assert_eq!(bad.status.unwrap().authenticated, Some(false));
        let jwks = c
            .request_text(
                http::Request::get("/openid/v1/jwks")
                    .body(Vec::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(jwks.contains("\"kid\":\"gamma-sa-1\""), "{jwks}");
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let ssar: Api<SelfSubjectAccessReview> = Api::all(c.clone());
        let ask = |name: &str| SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    resource: Some("secrets".into()),
                    name: Some(name.into()),
                    verb: Some("update".into()),
                    namespace: Some("istio-system".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(
            ssar.create(&PostParams::default(), &ask("cacerts"))
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        );
        s.forbid("secrets", "cacerts");
        assert!(
            !ssar
                .create(&PostParams::default(), &ask("cacerts"))
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        );
    });
}
