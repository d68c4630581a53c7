//! A loopback stand-in for the Kubernetes API server: core/v1 events only (POST, PATCH,
//! GET, LIST, namespaced and cluster-wide), with the real server's validation for core/v1
//! events (`ValidateEventCreate`/`ValidateEventUpdate` for the v1 request version, plus the
//! generic object-meta checks of the REST layer), `403` for `events.k8s.io`, and just enough
//! discovery (`/api`, `/apis`, `/api/v1`) for the real `kubectl get events`. Every request
//! is recorded. It runs on its own thread and runtime; [`FakeApiServer::stop`] takes it
//! down for real (listener and connections closed) and [`FakeApiServer::start_again`]
//! brings it back on the same port with the same objects. [`FakeApiServer::set_fault`]
//! makes the events endpoints misbehave as a sick server does: answer late (after doing
//! the work), or refuse with 403 (RBAC) or 500.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: String,
    pub status: u16,
    /// When the request arrived.
    pub at: std::time::Instant,
}

/// How the events endpoints misbehave (discovery, which `kubectl` needs, never does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Does the work, then answers this late.
    Slow(Duration),
    /// 403 Forbidden, as for a service account its ClusterRole does not allow this verb.
    Forbidden,
    /// 500 Internal Server Error, without doing the work.
    Internal,
}

#[derive(Default)]
struct Store {
    events: BTreeMap<(String, String), Value>,
    rv: u64,
    requests: Vec<Recorded>,
    fault: Fault,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    pub fn start() -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        Self::serve("127.0.0.1:0".parse().unwrap(), store)
    }

    fn serve(addr: SocketAddr, store: Arc<Mutex<Store>>) -> Self {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let st = store.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(
                    move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                        let st = st.clone();
                        async move {
                            let (resp, delay) = handle(&st, method, uri, headers, body);
                            if let Some(d) = delay {
                                tokio::time::sleep(d).await;
                            }
                            resp
                        }
                    },
                );
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime closes the listener and every open connection.
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().unwrap();
        FakeApiServer {
            addr,
            store,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes the server down: connections are refused until [`Self::start_again`].
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Brings a stopped server back on the same address with the same objects.
    pub fn start_again(&mut self) {
        assert!(self.thread.is_none(), "the server is running");
        let again = Self::serve(self.addr, self.store.clone());
        *self = again;
    }

    /// From now on the events endpoints misbehave so (`Fault::None` heals them).
    pub fn set_fault(&self, fault: Fault) {
        self.store.lock().unwrap().fault = fault;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.store.lock().unwrap().requests.clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.store
            .lock()
            .unwrap()
            .events
            .values()
            .cloned()
            .collect()
    }

    /// Deletes every stored event (as their TTL would).
    pub fn expire_events(&self) {
        self.store.lock().unwrap().events.clear();
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        );
        std::fs::write(path, text).unwrap();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: StatusCode, reason: &str, message: String, details: Value) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn invalid(name: &str, causes: Vec<(String, String)>) -> Response {
    let msg = causes
        .iter()
        .map(|(f, m)| format!("{f}: {m}"))
        .collect::<Vec<_>>()
        .join(", ");
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("Event \"{name}\" is invalid: {msg}"),
        json!({
            "name": name,
            "kind": "Event",
            "causes": causes.iter().map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f})).collect::<Vec<_>>(),
        }),
    )
}

fn not_found(name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("events \"{name}\" not found"),
        json!({"name": name, "kind": "events"}),
    )
}

/// The verb RBAC would check for a request on events.
fn verb(method: &Method, parts: &[&str]) -> &'static str {
    match method.as_str() {
        "POST" => "create",
        "PATCH" => "patch",
        "PUT" => "update",
        "DELETE" => "delete",
        _ if parts.last() == Some(&"events") => "list",
        _ => "get",
    }
}

/// The response of a sick server, or `None` to serve normally.
fn fault_response(fault: Fault, method: &Method, path: &str) -> Option<Response> {
    if !fault_applies(path) {
        return None;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ns = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, ..] => Some(*ns),
        _ => None,
    };
    match fault {
        Fault::None | Fault::Slow(_) => None,
        Fault::Forbidden => {
            let v = verb(method, &parts);
            let scope = ns
                .map(|n| format!("in the namespace \"{n}\""))
                .unwrap_or_else(|| "at the cluster scope".into());
            Some(status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "events is forbidden: User \"system:serviceaccount:kube-system:oomguard\" cannot {v} resource \"events\" in API group \"\" {scope}"
                ),
                json!({"kind": "events"}),
            ))
        }
        Fault::Internal => Some(status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out".into(),
            json!({"causes": [{"message": "etcdserver: request timed out"}]}),
        )),
    }
}

fn handle(
    store: &Mutex<Store>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (Response, Option<Duration>) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut st = store.lock().unwrap();
    let fault = st.fault;
    let resp = match fault_response(fault, &method, uri.path()) {
        Some(r) => r,
        None => route(&mut st, &method, uri.path(), &content_type, &body),
    };
    let delay = match fault {
        Fault::Slow(d) if fault_applies(uri.path()) => Some(d),
        _ => None,
    };
    st.requests.push(Recorded {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().unwrap_or("").to_string(),
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: resp.status().as_u16(),
        at: std::time::Instant::now(),
    });
    (resp, delay)
}

/// Faults hit the core/v1 events endpoints only (`/api/v1/[namespaces/NS/]events[/NAME]`).
fn fault_applies(path: &str) -> bool {
    path.starts_with("/api/v1/") && path.trim_matches('/').split('/').any(|p| p == "events")
}

fn route(st: &mut Store, method: &Method, path: &str, ct: &str, body: &[u8]) -> Response {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api"]) => axum::Json(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        }))
        .into_response(),
        ("GET", ["apis"]) => {
            axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
                .into_response()
        }
        ("GET", ["api", "v1"]) => axum::Json(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [{
                "name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortNames": ["ev"],
            }],
        }))
        .into_response(),
        (_, ["apis", "events.k8s.io", ..]) => status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "events.events.k8s.io is forbidden: User \"system:serviceaccount:kube-system:oomguard\" cannot access events.k8s.io".into(),
            json!({"group": "events.k8s.io", "kind": "events"}),
        ),
        ("GET", ["api", "v1", "events"]) => list(st, None),
        ("GET", ["api", "v1", "namespaces", ns, "events"]) => list(st, Some(ns)),
        ("POST", ["api", "v1", "namespaces", ns, "events"]) => create(st, ns, ct, body),
        ("GET", ["api", "v1", "namespaces", ns, "events", name]) => {
            match st.events.get(&(ns.to_string(), name.to_string())) {
                Some(ev) => axum::Json(ev.clone()).into_response(),
                None => not_found(name),
            }
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "events", name]) => patch(st, ns, name, ct, body),
        (m, ["api", "v1", "namespaces", _, "events", ..]) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{m} is not supported by this stand-in"),
            json!({}),
        ),
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
            json!({}),
        ),
    }
}

fn list(st: &Store, ns: Option<&str>) -> Response {
    let items: Vec<Value> = st
        .events
        .iter()
        .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
        .map(|(_, v)| v.clone())
        .collect();
    axum::Json(json!({
        "kind": "EventList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    }))
    .into_response()
}

fn create(st: &mut Store, ns: &str, ct: &str, body: &[u8]) -> Response {
    if !ct.starts_with("application/json") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf; got {ct:?}"
            ),
            json!({}),
        );
    }
    let mut ev: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the body is not a JSON object".into(),
                json!({}),
            );
        }
    };
    if let Some(k) = ev.get("kind").and_then(Value::as_str)
        && k != "Event"
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("kind {k} is not Event"),
            json!({}),
        );
    }
    if let Some(v) = ev.get("apiVersion").and_then(Value::as_str)
        && v != "v1"
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("apiVersion {v} is not v1"),
            json!({}),
        );
    }
    // The typed decode the real server does: wrong field types are a 400.
    if let Err(e) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(ev.clone()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("cannot decode the Event: {e}"),
            json!({}),
        );
    }
    let meta_ns = ev["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if meta_ns.is_empty() {
        ev["metadata"]["namespace"] = json!(ns);
    } else if meta_ns != ns {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
            json!({}),
        );
    }
    let name = ev["metadata"]["name"].as_str().unwrap_or("").to_string();
    let mut errs = validate_event(&ev);
    errs.extend(validate_meta(&ev));
    if !errs.is_empty() {
        return invalid(&name, errs);
    }
    let key = (ns.to_string(), name.clone());
    if st.events.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("events \"{name}\" already exists"),
            json!({"name": name, "kind": "events"}),
        );
    }
    st.rv += 1;
    ev["kind"] = json!("Event");
    ev["apiVersion"] = json!("v1");
    ev["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", st.rv));
    ev["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    ev["metadata"]["creationTimestamp"] = json!(
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap()
            .to_string()
    );
    st.events.insert(key, ev.clone());
    (StatusCode::CREATED, axum::Json(ev)).into_response()
}

fn patch(st: &mut Store, ns: &str, name: &str, ct: &str, body: &[u8]) -> Response {
    let ct = ct.split(';').next().unwrap_or("").trim();
    if ct != "application/strategic-merge-patch+json" && ct != "application/merge-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the stand-in accepts merge and strategic merge patches, not {ct:?}"),
            json!({}),
        );
    }
    let key = (ns.to_string(), name.to_string());
    let Some(old) = st.events.get(&key).cloned() else {
        return not_found(name);
    };
    let Ok(p) = serde_json::from_slice::<Value>(body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON".into(),
            json!({}),
        );
    };
    let mut new = old.clone();
    merge(&mut new, &p);
    if serde_json::from_value::<k8s_openapi::api::core::v1::Event>(new.clone()).is_err() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patched Event does not decode".into(),
            json!({}),
        );
    }
    let mut errs = validate_event(&new);
    // ValidateObjectMetaUpdate: name, namespace and uid are immutable.
    for f in ["name", "namespace", "uid"] {
        if new["metadata"][f] != old["metadata"][f] {
            errs.push((format!("metadata.{f}"), "field is immutable".into()));
        }
    }
    if !errs.is_empty() {
        return invalid(name, errs);
    }
    st.rv += 1;
    new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    st.events.insert(key, new.clone());
    axum::Json(new).into_response()
}

/// RFC 7386 merge (for the scalar fields an event patch touches, strategic merge is the same).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `legacyValidateEvent` (core/v1 requests get no more than this).
fn validate_event(ev: &Value) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let ns = s(&ev["metadata"]["namespace"]);
    let obj_ns = s(&ev["involvedObject"]["namespace"]);
    let event_time = ev.get("eventTime").is_some_and(|v| !v.is_null());
    if !event_time {
        if obj_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                errs.push((
                    "involvedObject.namespace".into(),
                    "does not match event.namespace".into(),
                ));
            }
        } else if ns != obj_ns {
            errs.push((
                "involvedObject.namespace".into(),
                "does not match event.namespace".into(),
            ));
        }
    } else {
        if obj_ns.is_empty() && ns != "default" && ns != "kube-system" {
            errs.push((
                "involvedObject.namespace".into(),
                "does not match event.namespace".into(),
            ));
        }
        let rc = s(&ev["reportingComponent"]);
        if rc.is_empty() {
            errs.push(("reportingController".into(), "Required value".into()));
        } else if !is_qualified_name(&rc) {
            errs.push((
                "reportingController".into(),
                "must be a qualified name".into(),
            ));
        }
        let ri = s(&ev["reportingInstance"]);
        if ri.is_empty() {
            errs.push(("reportingInstance".into(), "Required value".into()));
        } else if ri.len() > 128 {
            errs.push((
                "reportingInstance".into(),
                "can have at most 128 characters".into(),
            ));
        }
        let action = s(&ev["action"]);
        if action.is_empty() {
            errs.push(("action".into(), "Required value".into()));
        } else if action.len() > 128 {
            errs.push(("action".into(), "can have at most 128 characters".into()));
        }
        let reason = s(&ev["reason"]);
        if reason.is_empty() {
            errs.push(("reason".into(), "Required value".into()));
        } else if reason.len() > 128 {
            errs.push(("reason".into(), "can have at most 128 characters".into()));
        }
        if s(&ev["message"]).len() > 1024 {
            errs.push(("message".into(), "can have at most 1024 characters".into()));
        }
    }
    if !is_dns1123_subdomain(&ns) {
        errs.push(("namespace".into(), format!("{ns:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'")));
    }
    errs
}

/// The REST layer's `ValidateObjectMetaAccessor` with `ValidatePathSegmentName`.
fn validate_meta(ev: &Value) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let name = ev["metadata"]["name"].as_str().unwrap_or("");
    let generate = ev["metadata"]["generateName"].as_str().unwrap_or("");
    if name.is_empty() && generate.is_empty() {
        errs.push((
            "metadata.name".into(),
            "Required value: name or generateName is required".into(),
        ));
    }
    if name == "." || name == ".." {
        errs.push(("metadata.name".into(), format!("may not be '{name}'")));
    }
    for bad in ["/", "%"] {
        if name.contains(bad) {
            errs.push(("metadata.name".into(), format!("may not contain '{bad}'")));
        }
    }
    errs
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}
