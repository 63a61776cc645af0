//! A stand-in Kubernetes API server for tests: HTTPS with a generated CA, reached through a real
//! kubeconfig by the real `kube` client. Small, but faithful where cactl depends on it:
//! resourceVersion bumps and 409 Conflict on stale updates, 404, 201 vs 200, 422 for invalid
//! objects, label and field selectors, list + watch with bookmarks and timeouts, TokenReview and
//! SelfSubjectAccessReview, the service-account issuer's JWKS, and injectable faults (5xx,
//! latency, dropped connections, 403 for a named resource). Every request is counted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{Value, json};

/// Which resources are namespaced, by plural name.
fn namespaced(resource: &str) -> bool {
    !matches!(
        resource,
        "namespaces"
            | "clustertrustbundles"
            | "tokenreviews"
            | "selfsubjectaccessreviews"
            | "nodes"
    )
}

fn kind_of(resource: &str) -> &'static str {
    match resource {
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "namespaces" => "Namespace",
        "pods" => "Pod",
        "leases" => "Lease",
        "clustertrustbundles" => "ClusterTrustBundle",
        _ => "Unknown",
    }
}

/// One stored change, for watches.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    resource: String,
    namespace: String,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(String, String, String), Value>,
    log: Vec<Change>,
}

/// Injected faults.
#[derive(Default)]
pub struct Faults {
    /// Answer this many next requests with 500.
    pub fail_next: AtomicU64,
    /// Answer every request with 500 while set.
    pub fail_all: AtomicBool,
    /// Add this much latency (ms) to every request.
    pub latency_ms: AtomicU64,
    /// Close every new connection right after accepting it.
    pub drop_connections: AtomicBool,
    /// `resource/name` pairs (name may be `*`) answered with 403.
    pub forbidden: Mutex<Vec<(String, String)>>,
    /// A concurrent writer: right after the next GET of (resource, namespace, name), another
    /// client changes the object (adds label `racer: "1"`), bumping its resourceVersion.
    pub race_after_get: Mutex<Option<(String, String, String)>>,
}

/// Request counters.
#[derive(Default)]
pub struct Counters {
    /// All requests.
    pub total: AtomicU64,
    /// POST/PUT/PATCH/DELETE on stored objects (reviews excluded).
    pub writes: AtomicU64,
    /// GETs (lists, gets and watches).
    pub reads: AtomicU64,
    /// Watches opened.
    pub watches: AtomicU64,
    /// Conflicts answered.
    pub conflicts: AtomicU64,
}

/// A running stand-in cluster.
pub struct StandIn {
    pub name: String,
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub issuer: String,
    pub faults: Arc<Faults>,
    pub counters: Arc<Counters>,
    store: Arc<Mutex<Store>>,
    changes: tokio::sync::broadcast::Sender<Change>,
    token_key: Arc<(jsonwebtoken::EncodingKey, jsonwebtoken::DecodingKey, Value)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The bearer token every kubeconfig written by [`StandIn::kubeconfig`] uses.
pub const ADMIN_TOKEN: &str = "stand-in-admin-token";

struct Shared {
    name: String,
    issuer: String,
    store: Arc<Mutex<Store>>,
    changes: tokio::sync::broadcast::Sender<Change>,
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    token_key: Arc<(jsonwebtoken::EncodingKey, jsonwebtoken::DecodingKey, Value)>,
}

impl StandIn {
    /// Starts a stand-in named `name` on a loopback port.
    pub fn start(name: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // CA and serving certificate.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("stand-in {name} CA"));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let srv_key = rcgen::KeyPair::generate().unwrap();
        let mut srv_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        srv_params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let srv_cert = srv_params.signed_by(&srv_key, &issuer).unwrap();
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![srv_cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tls = Arc::new(tls);

        // The service-account token issuer.
        let tk =
            cactl::pki::key::SecretKey::generate(cactl::pki::key::KeyAlgorithm::EcdsaP256).unwrap();
        let spki = tk.public_key_spki();
        let point = &spki[spki.len() - 65..];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let kid = format!("{name}-sa-1");
        let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..])});
        let pem = tk.to_pkcs8_pem();
        let enc = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        let dec =
            jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone()).unwrap())
                .unwrap();
        let token_key = Arc::new((enc, dec, jwk));
        let issuer_url = format!("https://{name}.stand-in.example");

        let store = Arc::new(Mutex::new(Store::default()));
        let (changes, _) = tokio::sync::broadcast::channel(4096);
        let faults = Arc::new(Faults::default());
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            issuer: issuer_url.clone(),
            store: store.clone(),
            changes: changes.clone(),
            faults: faults.clone(),
            counters: counters.clone(),
            token_key: token_key.clone(),
        });
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            if shared.faults.drop_connections.load(Ordering::Relaxed) {
                                drop(tcp);
                                continue;
                            }
                            let acceptor = acceptor.clone();
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let Ok(tls) = acceptor.accept(tcp).await else { return };
                                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                    let shared = shared.clone();
                                    async move {
                                        let (parts, body) = req.into_parts();
                                        let bytes = http_body_util_collect(body).await;
                                        Ok::<_, std::convert::Infallible>(handle(shared, parts.method, parts.uri, &parts.headers, bytes).await)
                                    }
                                });
                                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        Self {
            name: name.to_owned(),
            addr,
            ca_pem: ca_cert.pem(),
            issuer: issuer_url,
            faults,
            counters,
            store,
            changes,
            token_key,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Starts a member cluster for `env`: namespaces `istio-system` and `default`, and a
    /// kubeconfig at `kube/<name>.yaml` under the env's directory.
    pub fn member(name: &str, env: &super::Env) -> Self {
        let s = Self::start(name);
        for ns in ["istio-system", "default"] {
            s.add_namespace(ns);
        }
        s.kubeconfig(&env.path(&format!("kube/{name}.yaml")));
        s
    }

    /// How many certificates `istio-ca-root-cert` in `ns` holds.
    pub fn istio_root_count(&self, ns: &str) -> usize {
        self.get("configmaps", ns, "istio-ca-root-cert").unwrap()["data"]["root-cert.pem"]
            .as_str()
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
    }

    /// Writes a kubeconfig for this cluster (context named like the cluster) to `path`.
    pub fn kubeconfig(&self, path: &Path) -> PathBuf {
        let b64 = base64::engine::general_purpose::STANDARD;
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {n}\nclusters:\n- name: {n}\n  cluster:\n    server: https://{a}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {n}-admin\nusers:\n- name: {n}-admin\n  user:\n    token: {t}\n",
            n = self.name,
            a = self.addr,
            ca = b64.encode(self.ca_pem.as_bytes()),
            t = ADMIN_TOKEN,
        );
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
        path.to_path_buf()
    }

    /// A projected service-account token of this cluster.
    pub fn token(
        &self,
        ns: &str,
        sa: &str,
        pod: Option<(&str, &str)>,
        audience: &str,
        ttl_secs: i64,
    ) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut k8s = json!({"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid"}});
        if let Some((pod, node)) = pod {
            k8s["pod"] = json!({"name": pod, "uid": format!("{pod}-uid")});
            k8s["node"] = json!({"name": node, "uid": format!("{node}-uid")});
        }
        let claims = json!({
            "iss": self.issuer, "aud": [audience], "iat": now, "nbf": now, "exp": now + ttl_secs,
            "sub": format!("system:serviceaccount:{ns}:{sa}"), "kubernetes.io": k8s,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = self.token_key.2["kid"].as_str().map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &self.token_key.0).unwrap()
    }

    /// Stores an object directly (test set-up), bumping resourceVersion and notifying watchers.
    pub fn put(&self, resource: &str, namespace: &str, mut object: Value) -> Value {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let mut st = self.store.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = (resource.to_owned(), namespace.to_owned(), name);
        let kind = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        fill_meta(&mut object, resource, namespace, rv);
        st.objects.insert(key, object.clone());
        let ch = Change {
            rv,
            kind,
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            object: object.clone(),
        };
        st.log.push(ch.clone());
        let _ = self.changes.send(ch);
        object
    }

    /// Deletes an object directly.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.store.lock().unwrap();
        let Some(mut obj) =
            st.objects
                .remove(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ch = Change {
            rv,
            kind: "DELETED",
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            object: obj,
        };
        st.log.push(ch.clone());
        let _ = self.changes.send(ch);
        true
    }

    /// Reads an object directly.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.store
            .lock()
            .unwrap()
            .objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Creates a namespace.
    pub fn add_namespace(&self, name: &str) {
        self.put(
            "namespaces",
            "",
            json!({"metadata": {"name": name}, "status": {"phase": "Active"}}),
        );
    }

    /// Creates a pod.
    pub fn add_pod(&self, ns: &str, name: &str, sa: &str, node: &str, phase: &str) {
        self.put(
            "pods",
            ns,
            json!({"metadata": {"name": name, "namespace": ns}, "spec": {"serviceAccountName": sa, "nodeName": node}, "status": {"phase": phase}}),
        );
    }

    /// Marks `resource/name` (name `*` for all) as forbidden.
    pub fn forbid(&self, resource: &str, name: &str) {
        self.faults
            .forbidden
            .lock()
            .unwrap()
            .push((resource.to_owned(), name.to_owned()));
    }

    /// Writes so far.
    pub fn writes(&self) -> u64 {
        self.counters.writes.load(Ordering::Relaxed)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn http_body_util_collect(body: hyper::body::Incoming) -> bytes::Bytes {
    use hyper::body::Body as _;
    let mut body = body;
    let mut out = Vec::new();
    while let Some(Ok(frame)) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    bytes::Bytes::from(out)
}

fn fill_meta(object: &mut Value, resource: &str, namespace: &str, rv: u64) {
    let kind = kind_of(resource);
    if object.get("kind").is_none() {
        object["kind"] = json!(kind);
    }
    if object.get("apiVersion").is_none() {
        object["apiVersion"] = json!(match resource {
            "leases" => "coordination.k8s.io/v1",
            "clustertrustbundles" => "certificates.k8s.io/v1beta1",
            _ => "v1",
        });
    }
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    if namespaced(resource) {
        meta.insert("namespace".into(), json!(namespace));
    }
    meta.entry("uid")
        .or_insert_with(|| json!(format!("uid-{rv}")));
    meta.entry("creationTimestamp")
        .or_insert_with(|| json!("2026-01-01T00:00:00Z"));
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn ok_json(code: StatusCode, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// Parsed request path.
struct Target {
    resource: String,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let t = |resource: &str, namespace: &str, name: Option<&&str>, sub: Option<&&str>| Target {
        resource: resource.to_owned(),
        namespace: namespace.to_owned(),
        name: name.map(|s| (*s).to_owned()),
        subresource: sub.map(|s| (*s).to_owned()),
    };
    Some(match rest {
        ["namespaces", ns, res, tail @ ..] if *res != "status" && *res != "finalize" => {
            t(res, ns, tail.first(), tail.get(1))
        }
        ["namespaces", name] => t("namespaces", "", Some(name), None),
        ["namespaces"] => t("namespaces", "", None, None),
        [res] => t(res, "", None, None),
        [res, name, tail @ ..] => t(res, "", Some(name), tail.first()),
        _ => return None,
    })
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`.
fn labels_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = obj["metadata"]["labels"].as_object();
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    sel.split(',').all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term).is_some()
        }
    })
}

fn fields_match(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v, neg) = match term.split_once("!=") {
            Some((k, v)) => (k, v, true),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((k, v)) => (k, v, false),
                None => return true,
            },
        };
        let mut cur = obj;
        for part in k.split('.') {
            cur = &cur[part];
        }
        (cur.as_str().unwrap_or("") == v) != neg
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b':'
        })
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

fn validate(resource: &str, obj: &Value) -> Result<(), String> {
    let Some(name) = obj["metadata"]["name"].as_str() else {
        return Err("metadata.name: Required value".into());
    };
    if !valid_name(name) {
        return Err(format!("metadata.name: Invalid value: {name:?}"));
    }
    if let Some(labels) = obj["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            if !v.is_string() || v.as_str().is_some_and(|s| s.len() > 63) || k.is_empty() {
                return Err(format!("metadata.labels: Invalid value: {k:?}"));
            }
        }
    }
    if resource == "secrets"
        && let Some(data) = obj["data"].as_object()
    {
        {
            for (k, v) in data {
                let ok = v
                    .as_str()
                    .is_some_and(|s| base64::engine::general_purpose::STANDARD.decode(s).is_ok());
                if !ok {
                    return Err(format!("data[{k}]: Invalid value: not base64"));
                }
            }
        }
    }
    if resource == "configmaps"
        && let Some(data) = obj["data"].as_object()
        && data.values().any(|v| !v.is_string())
    {
        return Err("data: Invalid value: values must be strings".into());
    }
    Ok(())
}

async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: &axum::http::HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let c = &shared.counters;
    c.total.fetch_add(1, Ordering::Relaxed);
    let latency = shared.faults.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if shared.faults.fail_all.load(Ordering::Relaxed)
        || shared
            .faults
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        );
    }
    let path = uri.path().to_owned();
    // Discovery-free endpoints.
    if path == "/openid/v1/jwks" {
        c.reads.fetch_add(1, Ordering::Relaxed);
        return ok_json(
            StatusCode::OK,
            &json!({"keys": [shared.token_key.2.clone()]}),
        );
    }
    if path == "/.well-known/openid-configuration" {
        return ok_json(
            StatusCode::OK,
            &json!({"issuer": shared.issuer, "jwks_uri": format!("{}/openid/v1/jwks", shared.issuer)}),
        );
    }
    if path == "/version" {
        return ok_json(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": format!("v1.33.0-stand-in-{}", shared.name)}),
        );
    }
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {ADMIN_TOKEN}"));
    if !authorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let Some(t) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let q = query(&uri);
    let verb = match (&method, &t.name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    };
    {
        let forbidden = shared.faults.forbidden.lock().unwrap();
        let name = t.name.clone().unwrap_or_default();
        if forbidden
            .iter()
            .any(|(r, n)| *r == t.resource && (n == "*" || *n == name))
        {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{} \"{name}\" is forbidden: User \"stand-in\" cannot {verb} resource \"{}\"",
                    t.resource, t.resource
                ),
            );
        }
    }
    match t.resource.as_str() {
        "tokenreviews" => return token_review(&shared, &body),
        "selfsubjectaccessreviews" => return access_review(&shared, &body),
        _ => {}
    }
    match verb {
        "list" => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            let st = shared.store.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((r, ns, _), o)| {
                    *r == t.resource
                        && (t.namespace.is_empty() || *ns == t.namespace)
                        && labels_match(o, q.get("labelSelector"))
                        && fields_match(o, q.get("fieldSelector"))
                })
                .map(|(_, o)| o.clone())
                .collect();
            ok_json(
                StatusCode::OK,
                &json!({"kind": format!("{}List", kind_of(&t.resource)), "apiVersion": "v1",
                "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        "get" => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            let mut st = shared.store.lock().unwrap();
            let key = (
                t.resource.clone(),
                t.namespace.clone(),
                t.name.clone().unwrap_or_default(),
            );
            let race = {
                let mut r = shared.faults.race_after_get.lock().unwrap();
                if r.as_ref() == Some(&key) {
                    r.take()
                } else {
                    None
                }
            };
            let found = st.objects.get(&key).cloned();
            if let (Some(_), Some(k)) = (&found, race) {
                // The answer carries the old resourceVersion; the store moves on.
                st.rv += 1;
                let rv = st.rv;
                if let Some(obj) = st.objects.get_mut(&k) {
                    obj["metadata"]["labels"]["racer"] = json!("1");
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let ch = Change {
                        rv,
                        kind: "MODIFIED",
                        resource: k.0.clone(),
                        namespace: k.1.clone(),
                        object: obj.clone(),
                    };
                    st.log.push(ch.clone());
                    let _ = shared.changes.send(ch);
                }
            }
            match found {
                Some(o) => ok_json(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!(
                        "{} \"{}\" not found",
                        t.resource,
                        t.name.unwrap_or_default()
                    ),
                ),
            }
        }
        "watch" => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.watches.fetch_add(1, Ordering::Relaxed);
            watch(shared.clone(), t, q)
        }
        "create" | "update" | "patch" => {
            let mut obj: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid JSON: {e}"),
                    );
                }
            };
            if verb == "patch" {
                // JSON merge patch (what cactl sends); strategic merge is treated the same for
                // the flat objects stored here.
                let st = shared.store.lock().unwrap();
                let key = (
                    t.resource.clone(),
                    t.namespace.clone(),
                    t.name.clone().unwrap_or_default(),
                );
                let Some(cur) = st.objects.get(&key).cloned() else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{}\" not found", t.resource, key.2),
                    );
                };
                drop(st);
                let mut merged = cur;
                merge_patch(&mut merged, &obj);
                obj = merged;
            }
            if let Err(m) = validate(&t.resource, &obj) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &m);
            }
            c.writes.fetch_add(1, Ordering::Relaxed);
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if let Some(n) = &t.name
                && *n != name
            {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            let mut st = shared.store.lock().unwrap();
            let key = (t.resource.clone(), t.namespace.clone(), name.clone());
            let existing = st.objects.get(&key).cloned();
            let code = match (verb, &existing) {
                ("create", Some(_)) => {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", t.resource),
                    );
                }
                ("create", None) => StatusCode::CREATED,
                (_, None) => {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("{} \"{name}\" not found", t.resource),
                    );
                }
                (_, Some(cur)) => {
                    let want = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                    if verb == "update"
                        && !want.is_empty()
                        && want != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                    {
                        c.conflicts.fetch_add(1, Ordering::Relaxed);
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                                t.resource
                            ),
                        );
                    }
                    obj["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                    obj["metadata"]["creationTimestamp"] =
                        cur["metadata"]["creationTimestamp"].clone();
                    StatusCode::OK
                }
            };
            st.rv += 1;
            let rv = st.rv;
            fill_meta(&mut obj, &t.resource, &t.namespace, rv);
            st.objects.insert(key, obj.clone());
            let ch = Change {
                rv,
                kind: if code == StatusCode::CREATED {
                    "ADDED"
                } else {
                    "MODIFIED"
                },
                resource: t.resource.clone(),
                namespace: t.namespace.clone(),
                object: obj.clone(),
            };
            st.log.push(ch.clone());
            let _ = shared.changes.send(ch);
            ok_json(code, &obj)
        }
        "delete" => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            let mut st = shared.store.lock().unwrap();
            let key = (
                t.resource.clone(),
                t.namespace.clone(),
                t.name.clone().unwrap_or_default(),
            );
            match st.objects.remove(&key) {
                Some(mut obj) => {
                    st.rv += 1;
                    let rv = st.rv;
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let ch = Change {
                        rv,
                        kind: "DELETED",
                        resource: t.resource.clone(),
                        namespace: t.namespace.clone(),
                        object: obj.clone(),
                    };
                    st.log.push(ch.clone());
                    let _ = shared.changes.send(ch);
                    ok_json(StatusCode::OK, &obj)
                }
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{}\" not found", t.resource, key.2),
                ),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn watch(shared: Arc<Shared>, t: Target, q: BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(290)
        .min(290);
    let label_sel = q.get("labelSelector").cloned();
    let field_sel = q.get("fieldSelector").cloned();
    let mut rx = shared.changes.subscribe();
    // Replay: from 0 means "current state as ADDED", else the log after `from`.
    let (backlog, now_rv) = {
        let st = shared.store.lock().unwrap();
        let backlog: Vec<Change> = if from == 0 {
            st.objects
                .iter()
                .filter(|((r, _, _), _)| *r == t.resource)
                .map(|((r, ns, _), o)| Change {
                    rv: st.rv,
                    kind: "ADDED",
                    resource: r.clone(),
                    namespace: ns.clone(),
                    object: o.clone(),
                })
                .collect()
        } else {
            st.log
                .iter()
                .filter(|c| c.rv > from && c.resource == t.resource)
                .cloned()
                .collect()
        };
        (backlog, st.rv)
    };
    let matches = {
        let t_res = t.resource.clone();
        let t_ns = t.namespace.clone();
        move |c: &Change| {
            c.resource == t_res
                && (t_ns.is_empty() || c.namespace == t_ns)
                && labels_match(&c.object, label_sel.as_ref())
                && fields_match(&c.object, field_sel.as_ref())
        }
    };
    let kind = kind_of(&t.resource);
    let stream = async_stream::stream! {
        let line = |typ: &str, obj: &Value| -> Result<bytes::Bytes, std::io::Error> {
            Ok(bytes::Bytes::from(format!("{}\n", json!({"type": typ, "object": obj}))))
        };
        for c in backlog.iter().filter(|c| matches(c)) {
            yield line(c.kind, &c.object);
        }
        let mut last = now_rv.max(from);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => {
                    if bookmarks {
                        yield line("BOOKMARK", &json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": last.to_string()}}));
                    }
                }
                msg = rx.recv() => match msg {
                    Ok(c) => {
                        if c.rv <= last { continue; }
                        last = c.rv;
                        if matches(&c) { yield line(c.kind, &c.object); }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(_) => break,
                }
            }
        }
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn token_review(shared: &Shared, body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let token = req["spec"]["token"].as_str().unwrap_or("");
    let audiences: Vec<String> = req["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_issuer(&[&shared.issuer]);
    if audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&audiences);
    }
    let status = match jsonwebtoken::decode::<Value>(token, &shared.token_key.1, &v) {
        Ok(data) => {
            let c = data.claims;
            let ns = c["kubernetes.io"]["namespace"].as_str().unwrap_or("");
            let sa = c["kubernetes.io"]["serviceaccount"]["name"]
                .as_str()
                .unwrap_or("");
            let mut extra = serde_json::Map::new();
            if let Some(p) = c["kubernetes.io"]["pod"]["name"].as_str() {
                extra.insert("authentication.kubernetes.io/pod-name".into(), json!([p]));
                extra.insert(
                    "authentication.kubernetes.io/pod-uid".into(),
                    json!([c["kubernetes.io"]["pod"]["uid"]]),
                );
            }
            if let Some(n) = c["kubernetes.io"]["node"]["name"].as_str() {
                extra.insert("authentication.kubernetes.io/node-name".into(), json!([n]));
            }
            json!({"authenticated": true, "audiences": audiences, "user": {
                "username": format!("system:serviceaccount:{ns}:{sa}"), "uid": "sa-uid",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": extra}})
        }
        Err(e) => json!({"authenticated": false, "error": e.to_string()}),
    };
    ok_json(
        StatusCode::CREATED,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": req["spec"], "status": status}),
    )
}

fn access_review(shared: &Shared, body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ra = &req["spec"]["resourceAttributes"];
    let resource = ra["resource"].as_str().unwrap_or("");
    let name = ra["name"].as_str().unwrap_or("");
    let denied = shared
        .faults
        .forbidden
        .lock()
        .unwrap()
        .iter()
        .any(|(r, n)| r == resource && (n == "*" || n == name || name.is_empty()));
    ok_json(
        StatusCode::CREATED,
        &json!({"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1", "metadata": {},
            "spec": req["spec"], "status": {"allowed": !denied}}),
    )
}
