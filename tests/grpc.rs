//! The signing service through the real binary over real TLS: every status code with its
//! reason, mTLS, TLS properties (ALPN h2, TLS 1.2 and 1.3), metrics and health, hot swap of
//! issuers under load, and graceful shutdown.

mod common;

use std::collections::BTreeMap;

use cactl::grpc::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use common::{Env, Server, TokenKey, csr_agent, csr_with, http_get, jwks};
use rcgen::SanType;
use tonic::Code;

const EAST_ISS: &str = "https://east.example";
const WEST_ISS: &str = "https://west.example";

struct Mesh {
    env: Env,
    east: TokenKey,
    west: TokenKey,
    bundle: String,
}

fn mesh(extra_config: &str) -> Mesh {
    let env = Env::new();
    let east = TokenKey::new("east-1", false);
    let west = TokenKey::new("west-1", true);
    env.write("east-jwks.json", jwks(&[&east]));
    env.write("west-jwks.json", jwks(&[&west]));
    env.write(
        "cactl.yaml",
        format!(
            "serve:\n  dns_names: [cactl.test.svc, localhost]\n  max_message_bytes: 16384\n{extra_config}clusters:\n\
             - name: east\n  auth: {{issuer: \"{EAST_ISS}\", jwks_file: east-jwks.json}}\n\
             - name: west\n  auth: {{issuer: \"{WEST_ISS}\", jwks_file: west-jwks.json}}\n\
             - name: pending\n  auth: {{issuer: \"{EAST_ISS}\", jwks_file: east-jwks.json}}\n"
        ),
    );
    env.ok(&["init"]);
    env.ok(&["issue", "east"]);
    env.ok(&["issue", "west"]);
    let bundle = env.ok(&["bundle"]);
    Mesh {
        env,
        east,
        west,
        bundle,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(
    server: &Server,
    bundle: &str,
) -> IstioCertificateServiceClient<tonic::transport::Channel> {
    let ch = cactl::client::connect(&server.grpc, bundle, "cactl.test.svc")
        .await
        .unwrap();
    IstioCertificateServiceClient::new(ch)
}

#[derive(Default)]
struct Call<'a> {
    csr: String,
    token: Option<&'a str>,
    cluster: Option<&'a str>,
    impersonate: Option<&'a str>,
    ttl: i64,
}

async fn call(
    c: &mut IstioCertificateServiceClient<tonic::transport::Channel>,
    args: Call<'_>,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = cactl::client::request(&args.csr, args.ttl, args.token, args.cluster).unwrap();
    if let Some(id) = args.impersonate {
        let md = req.get_mut().metadata.get_or_insert_with(Default::default);
        md.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.into())),
            },
        );
    }
    c.create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

#[test]
fn issues_for_both_client_styles_with_the_right_chain() {
    let m = mesh("");
    let server = Server::start(&m.env, &[]);
    rt().block_on(async {
        let mut c = client(&server, &m.bundle).await;
        let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_RSA_SHA256] {
            let csr = if std::ptr::eq(alg, &rcgen::PKCS_RSA_SHA256) {
                // rcgen cannot generate RSA keys with ring; take one from cactl.
                let key =
                    cactl::pki::key::SecretKey::generate(cactl::pki::key::KeyAlgorithm::Rsa2048)
                        .unwrap();
                cactl::client::make_csr(&key, &id("shop", "web"), true).unwrap()
            } else {
                csr_agent(&id("shop", "web"), alg)
            };
            let chain = call(
                &mut c,
                Call {
                    csr,
                    token: Some(&tok),
                    cluster: Some("east"),
                    ttl: 3600,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(chain.len(), 3, "leaf, intermediate, bundle");
            let leaf = cactl::pki::cert::CertInfo::from_pem_first(&chain[0]).unwrap();
            assert_eq!(leaf.uris, vec![id("shop", "web")]);
            assert_eq!(
                leaf.not_after - leaf.not_before,
                time::Duration::hours(1) + time::Duration::minutes(2)
            );
            let int = cactl::pki::cert::CertInfo::from_pem_first(&chain[1]).unwrap();
            assert!(int.subject.contains("OU=east"), "{}", int.subject);
            assert_eq!(chain[2], m.bundle);
            let ders: Vec<Vec<u8>> = vec![leaf.der.clone(), int.der.clone()];
            let roots = cactl::pki::pem::certificates(&m.bundle).unwrap();
            cactl::pki::chain::verify(&ders, &roots, time::OffsetDateTime::now_utc()).unwrap();
        }
        // West uses RS256 tokens and its own intermediate.
        let tok = m.west.token(WEST_ISS, "shop", "db", |_| {});
        let chain = call(
            &mut c,
            Call {
                csr: csr_agent(&id("shop", "db"), &rcgen::PKCS_ECDSA_P256_SHA256),
                token: Some(&tok),
                cluster: Some("west"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let int = cactl::pki::cert::CertInfo::from_pem_first(&chain[1]).unwrap();
        assert!(int.subject.contains("OU=west"), "{}", int.subject);
        // Default TTL 24h; above max (48h) clamped.
        let leaf = cactl::pki::cert::CertInfo::from_pem_first(&chain[0]).unwrap();
        assert_eq!(
            leaf.not_after - leaf.not_before,
            time::Duration::hours(24) + time::Duration::minutes(2)
        );
        let chain = call(
            &mut c,
            Call {
                csr: csr_agent(&id("shop", "db"), &rcgen::PKCS_ECDSA_P256_SHA256),
                token: Some(&tok),
                cluster: Some("west"),
                ttl: 90 * 86400,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let leaf = cactl::pki::cert::CertInfo::from_pem_first(&chain[0]).unwrap();
        assert_eq!(
            leaf.not_after - leaf.not_before,
            time::Duration::hours(48) + time::Duration::minutes(2)
        );
        // No clusterid header: the first cluster (east).
        let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
        call(
            &mut c,
            Call {
                csr: csr_agent(&id("shop", "web"), &rcgen::PKCS_ECDSA_P256_SHA256),
                token: Some(&tok),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    });
}

#[test]
fn every_status_code_with_its_reason() {
    // No scheduled rotation: it would issue the "pending" cluster an intermediate while the
    // cases run, and the "issuer not ready" case needs it to have none.
    let m = mesh("rotation:\n  interval: 0s\n");
    let mut server = Server::start(&m.env, &[]);
    rt().block_on(async {
        let mut c = client(&server, &m.bundle).await;
        let good_csr = || csr_agent(&id("shop", "web"), &rcgen::PKCS_ECDSA_P256_SHA256);
        let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let expired = m.east.token(EAST_ISS, "shop", "web", |c| {
            c["exp"] = (now - 3600).into();
            c["iat"] = (now - 7200).into();
            c["nbf"] = (now - 7200).into();
        });
        let wrong_aud = m.east.token(EAST_ISS, "shop", "web", |c| {
            c["aud"] = serde_json::json!(["kubernetes"])
        });
        let wrong_iss = m.east.token("https://evil.example", "shop", "web", |_| {});
        let west_tok = m.west.token(WEST_ISS, "shop", "web", |_| {});
        let forged = TokenKey::new("east-1", false).token(EAST_ISS, "shop", "web", |_| {});
        let ztunnel = m.east.token(EAST_ISS, "istio-system", "ztunnel", |_| {});
        let db_id = id("shop", "db");

        let mut tampered = cactl::pki::pem::csr(&good_csr()).unwrap();
        let pos = tampered
            .windows(7)
            .position(|w| w == b"sa/web/" || w.starts_with(b"ns/shop"))
            .unwrap();
        tampered[pos + 3] ^= 0x01;
        let tampered = cactl::pki::pem::encode("CERTIFICATE REQUEST", &tampered);

        let cases: Vec<(&str, Call<'_>, Code, &str)> = vec![
            (
                "no token",
                Call {
                    csr: good_csr(),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "expired token",
                Call {
                    csr: good_csr(),
                    token: Some(&expired),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "wrong audience",
                Call {
                    csr: good_csr(),
                    token: Some(&wrong_aud),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "wrong issuer",
                Call {
                    csr: good_csr(),
                    token: Some(&wrong_iss),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "token of another cluster",
                Call {
                    csr: good_csr(),
                    token: Some(&west_tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "forged token with a known kid",
                Call {
                    csr: good_csr(),
                    token: Some(&forged),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "unknown clusterid",
                Call {
                    csr: good_csr(),
                    token: Some(&tok),
                    cluster: Some("mars"),
                    ..Default::default()
                },
                Code::Unauthenticated,
                "request authenticate failure",
            ),
            (
                "CSR for another service account",
                Call {
                    csr: csr_agent(&id("shop", "db"), &rcgen::PKCS_ECDSA_P256_SHA256),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::PermissionDenied,
                "does not match the caller identity spiffe://cluster.local/ns/shop/sa/web",
            ),
            (
                "two URIs",
                Call {
                    csr: csr_with(vec![uri(&id("shop", "web")), uri(&id("shop", "x"))], |_| {}),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "CSR requests 2 URIs",
            ),
            (
                "DNS SAN",
                Call {
                    csr: csr_with(
                        vec![
                            uri(&id("shop", "web")),
                            SanType::DnsName("web.shop".try_into().unwrap()),
                        ],
                        |_| {},
                    ),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "CSR requests DNS names (web.shop)",
            ),
            (
                "garbage CSR",
                Call {
                    csr: "not a csr".into(),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "CSR: no CERTIFICATE REQUEST PEM block found",
            ),
            (
                "bad CSR signature",
                Call {
                    csr: tampered,
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "CSR: CSR signature does not verify",
            ),
            (
                "impersonation by an untrusted account",
                Call {
                    csr: csr_agent(&id("shop", "db"), &rcgen::PKCS_ECDSA_P256_SHA256),
                    token: Some(&tok),
                    cluster: Some("east"),
                    impersonate: Some(&db_id),
                    ..Default::default()
                },
                Code::PermissionDenied,
                "impersonation denied: shop/web is not a trusted node account",
            ),
            (
                "impersonation without a pod index",
                Call {
                    csr: csr_agent(&id("shop", "db"), &rcgen::PKCS_ECDSA_P256_SHA256),
                    token: Some(&ztunnel),
                    cluster: Some("east"),
                    impersonate: Some(&db_id),
                    ..Default::default()
                },
                Code::PermissionDenied,
                "impersonation denied: no pod index for cluster \"east\"",
            ),
            (
                "issuer not ready",
                Call {
                    csr: good_csr(),
                    token: Some(&tok),
                    cluster: Some("pending"),
                    ..Default::default()
                },
                Code::Unavailable,
                "no issuer is ready for cluster \"pending\"",
            ),
            (
                "oversized request",
                Call {
                    csr: "A".repeat(20_000),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
                Code::OutOfRange,
                "decoded message length too large",
            ),
        ];
        for (name, args, code, msg) in cases {
            let err = call(&mut c, args).await.expect_err(name);
            assert_eq!(err.code(), code, "{name}: {err:?}");
            assert!(
                err.message().contains(msg),
                "{name}: {:?} lacks {msg:?}",
                err.message()
            );
        }
    });
    let (_, metrics) = http_get(&server.metrics, "/metrics");
    assert!(
        metrics.contains("cactl_requests_total{cluster=\"east\",code=\"PermissionDenied\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_requests_total{cluster=\"\",code=\"Unauthenticated\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_auth_failures_total{reason=\"expired\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_auth_failures_total{reason=\"unknown_cluster\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_auth_failures_total{reason=\"no_credentials\"} 1"),
        "{metrics}"
    );
    // Stopping the server writes every log line still queued (workers hand theirs over in
    // batches), so the whole log is checked.
    assert_eq!(server.terminate(), 0, "{}", server.logs());
    let logs = server.logs();
    assert!(!logs.contains("eyJ"), "a token leaked into the logs");
    assert!(!logs.contains("PRIVATE KEY"), "a key leaked into the logs");
}

#[test]
fn token_cache_hits_and_metrics_and_health() {
    let m = mesh("");
    let mut server = Server::start(&m.env, &[]);
    assert_eq!(http_get(&server.metrics, "/healthz"), (200, "ok\n".into()));
    assert_eq!(
        http_get(&server.metrics, "/readyz"),
        (200, "ready\n".into())
    );
    rt().block_on(async {
        let mut c = client(&server, &m.bundle).await;
        let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
        for _ in 0..5 {
            call(
                &mut c,
                Call {
                    csr: csr_agent(&id("shop", "web"), &rcgen::PKCS_ECDSA_P256_SHA256),
                    token: Some(&tok),
                    cluster: Some("east"),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    });
    let (code, metrics) = http_get(&server.metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("cactl_auth_cache_misses_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_auth_cache_hits_total 4\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_requests_total{cluster=\"east\",code=\"Ok\"} 5"),
        "{metrics}"
    );
    // Every configured cluster's success series exists from the start.
    assert!(
        metrics.contains("cactl_requests_total{cluster=\"west\",code=\"Ok\"} 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_sign_duration_seconds_count 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_issuer_not_after_timestamp_seconds{cluster=\"east\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_issuer_not_after_timestamp_seconds{cluster=\"west\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_root_not_after_timestamp_seconds{root=\"root-1\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cactl_serving_cert_not_after_timestamp_seconds"),
        "{metrics}"
    );
    // Stopping the server writes every log line still queued.
    assert_eq!(server.terminate(), 0, "{}", server.logs());
    let logs = server.logs();
    assert!(logs.contains("issued workload certificate"), "{logs}");
    assert!(
        logs.contains("identity=spiffe://cluster.local/ns/shop/sa/web"),
        "{logs}"
    );
    assert!(logs.contains("serial="), "{logs}");
}

#[test]
fn mtls_client_certificate_authenticates() {
    let m = mesh("");
    // A workload certificate from cactl itself serves as the client certificate.
    let key =
        cactl::pki::key::SecretKey::generate(cactl::pki::key::KeyAlgorithm::EcdsaP256).unwrap();
    m.env.write(
        "vm.csr",
        cactl::client::make_csr(&key, &id("vm", "legacy"), false).unwrap(),
    );
    let chain = m.env.ok(&["sign", "--cluster", "east", "--csr", "vm.csr"]);
    let server = Server::start(&m.env, &[]);
    rt().block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&m.bundle))
            .domain_name("cactl.test.svc")
            .identity(tonic::transport::Identity::from_pem(
                &chain,
                key.to_pkcs8_pem().as_bytes(),
            ));
        cactl::tls::install_default_provider();
        let ch = tonic::transport::Channel::from_shared(format!("https://{}", server.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = IstioCertificateServiceClient::new(ch);
        let chain = call(
            &mut c,
            Call {
                csr: csr_agent(&id("vm", "legacy"), &rcgen::PKCS_ECDSA_P256_SHA256),
                cluster: Some("east"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            cactl::pki::cert::CertInfo::from_pem_first(&chain[0])
                .unwrap()
                .uris,
            vec![id("vm", "legacy")]
        );
        let err = call(
            &mut c,
            Call {
                csr: csr_agent(&id("vm", "other"), &rcgen::PKCS_ECDSA_P256_SHA256),
                cluster: Some("east"),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    });
}

#[test]
fn tls_negotiates_h2_on_tls12_and_tls13_and_presents_the_configured_names() {
    let m = mesh("");
    let server = Server::start(&m.env, &[]);
    m.env.write("bundle.pem", &m.bundle);
    for version in ["-tls1_2", "-tls1_3"] {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &server.grpc,
                "-alpn",
                "h2",
                version,
                "-servername",
                "cactl.test.svc",
                "-CAfile",
                "bundle.pem",
                "-verify_return_error",
                "-verify_hostname",
                "cactl.test.svc",
            ])
            .current_dir(m.env.dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ALPN protocol: h2"), "{version}: {text}");
        assert!(
            text.contains("Verify return code: 0 (ok)"),
            "{version}: {text}"
        );
    }
    // A client that does not offer h2 gets no ALPN agreement (and gRPC needs h2).
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &server.grpc,
            "-alpn",
            "http/1.1",
            "-servername",
            "cactl.test.svc",
        ])
        .current_dir(m.env.dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("ALPN protocol: http/1.1"), "{text}");
}

#[test]
fn hot_swap_under_load_fails_no_request() {
    let m = mesh("  reload_interval: 200ms\n");
    let mut server = Server::start(&m.env, &[]);
    let roots = cactl::pki::pem::certificates(&m.bundle).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serials = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let stop = stop.clone();
        let serials = serials.clone();
        let grpc = server.grpc.clone();
        let bundle = m.bundle.clone();
        let tok = m.east.token(EAST_ISS, "shop", &format!("w{w}"), |_| {});
        let roots = roots.clone();
        workers.push(std::thread::spawn(move || {
            rt().block_on(async move {
                let ch = cactl::client::connect(&grpc, &bundle, "cactl.test.svc")
                    .await
                    .unwrap();
                let mut c = IstioCertificateServiceClient::new(ch);
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let chain = call(
                        &mut c,
                        Call {
                            csr: csr_agent(
                                &id("shop", &format!("w{w}")),
                                &rcgen::PKCS_ECDSA_P256_SHA256,
                            ),
                            token: Some(&tok),
                            cluster: Some("east"),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap_or_else(|e| panic!("request failed during hot swap: {e:?}"));
                    // Every chain verifies under the bundle it came with.
                    let leaf = cactl::pki::pem::certificates(&chain[0]).unwrap();
                    let int = cactl::pki::pem::certificates(&chain[1]).unwrap();
                    let bundle_roots = cactl::pki::pem::certificates(&chain[2]).unwrap();
                    assert_eq!(bundle_roots, roots);
                    cactl::pki::chain::verify(
                        &[leaf[0].clone(), int[0].clone()],
                        &bundle_roots,
                        time::OffsetDateTime::now_utc(),
                    )
                    .unwrap();
                    let serial = cactl::pki::cert::CertInfo::from_der(&int[0])
                        .unwrap()
                        .serial_hex;
                    *serials.lock().unwrap().entry(serial).or_default() += 1;
                    n += 1;
                }
                n
            })
        }));
    }
    // Rotate east's intermediate twice while the workers hammer the server.
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(700));
        m.env.ok(&["issue", "east"]);
    }
    std::thread::sleep(std::time::Duration::from_millis(1200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: usize = workers
        .into_iter()
        .map(|w| w.join().expect("worker panicked"))
        .sum();
    let seen = serials.lock().unwrap().clone();
    assert!(total > 20, "only {total} requests");
    assert_eq!(
        seen.len(),
        3,
        "requests should have been served by all three intermediates: {seen:?}"
    );
    // Stopping the server writes every log line still queued.
    assert_eq!(server.terminate(), 0, "{}", server.logs());
    let logs = server.logs();
    assert!(logs.contains("issuers swapped"), "{logs}");
    assert!(logs.contains("serving certificate renewed"), "{logs}");
}

#[test]
fn sigterm_stops_cleanly() {
    let m = mesh("");
    let mut server = Server::start(&m.env, &[]);
    rt().block_on(async {
        let mut c = client(&server, &m.bundle).await;
        let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
        call(
            &mut c,
            Call {
                csr: csr_agent(&id("shop", "web"), &rcgen::PKCS_ECDSA_P256_SHA256),
                token: Some(&tok),
                cluster: Some("east"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    });
    assert_eq!(server.terminate(), 0, "{}", server.logs());
    assert!(
        server
            .logs()
            .contains("shutting down: finishing in-flight requests")
    );
}

/// A request in flight when SIGTERM arrives is answered in full; the server then exits 0. The
/// stream is opened (headers sent) before the signal and its body is sent only after it, so
/// the server is certainly draining while it handles the request.
#[test]
fn sigterm_finishes_in_flight_requests() {
    use prost::Message as _;
    let m = mesh("");
    let mut server = Server::start(&m.env, &[]);
    let tok = m.east.token(EAST_ISS, "shop", "web", |_| {});
    let csr = csr_agent(&id("shop", "web"), &rcgen::PKCS_ECDSA_P256_SHA256);
    let pid = server.child.id().to_string();
    rt().block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for der in cactl::pki::pem::certificates(&m.bundle).unwrap() {
            roots
                .add(rustls::pki_types::CertificateDer::from(der))
                .unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(cactl::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(&server.grpc).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("cactl.test.svc").unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let (send, connection) = h2::client::handshake(tls).await.unwrap();
        let conn = tokio::spawn(connection);
        let req = cactl::client::request(&csr, 0, Some(&tok), Some("east")).unwrap();
        let mut request = http::Request::post(
            "https://cactl.test.svc/istio.v1.auth.IstioCertificateService/CreateCertificate",
        )
        .body(())
        .unwrap();
        *request.headers_mut() = req.metadata().clone().into_headers();
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        request
            .headers_mut()
            .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let mut send = send.ready().await.unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;

        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;

        let msg = req.into_inner().encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&msg);
        stream.send_data(body.into(), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        // gRPC headers only: no `date` (the server turns hyper's off).
        let names: Vec<&str> = response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"], "{:?}", response.headers());
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let mut body = response.into_body();
        let mut buf = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        let reply = cactl::grpc::proto::IstioCertificateResponse::decode(&buf[5..]).unwrap();
        assert_eq!(reply.cert_chain.len(), 3, "{:?}", reply.cert_chain);
        // The connection was told to go away: it ends once the stream is done.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn).await;
    });
    assert_eq!(server.terminate(), 0, "{}", server.logs());
    assert!(
        server
            .logs()
            .contains("shutting down: finishing in-flight requests")
    );
}

#[test]
fn serve_refuses_to_start_without_state_or_issuers() {
    let env = Env::new();
    env.write("cactl.yaml", "clusters:\n- name: east\n");
    let r = env.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no state found"), "{}", r.stderr);
    env.ok(&["init"]);
    let r = env.run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(
            "no cluster has a usable intermediate: east: cluster \"east\" has no intermediate yet"
        ),
        "{}",
        r.stderr
    );
    env.write(
        "cactl.yaml",
        "serve:\n  listen: nowhere\nclusters:\n- name: east\n",
    );
    let r = env.run(&["serve"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("serve.listen: \"nowhere\" is not an address"),
        "{}",
        r.stderr
    );
}

#[test]
fn embedded_defaults_serve_and_request_work_without_a_config() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    assert!(
        !env.path("cactl.yaml").exists(),
        "embedded defaults write no config"
    );
    let out = env.request_demo_app(&server.grpc, "localhost", None);
    assert!(out.contains("got 3 element(s)"), "{out}");
    let r = common::openssl(
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "got/root-cert.pem",
            "-untrusted",
            "got/cert-chain.pem",
            "got/cert-chain.pem",
        ],
        env.dir.path(),
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}
