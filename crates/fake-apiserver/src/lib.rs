//! An in-memory Kubernetes API server for the operator's tests, its benchmark and the local demo.
//!
//! It is a crate of its own, not a feature of the operator, so that test support can never end
//! up in the release binary and does not need the product to build: it knows nothing of the
//! operator ([`install_crd`] takes the CRD to install as an argument). Fault injection is not
//! here but in `kube-fault-proxy`, which sits in front of this server or of a real cluster alike
//! and logs the requests it relays. This server keeps a request log of its own too
//! ([`FakeApiServer::request_log`]): what actually reached the API server, so that a benchmark
//! can count the same requests on both sides of the proxy and see where they differ.
//!
//! A real `kube::Client`, kube-runtime's `watcher`/`Controller`, `kube-lease-manager`, `kubectl`
//! and the operator binary (through [`FakeApiServer::kubeconfig_yaml`]) talk to it over plain
//! HTTP on 127.0.0.1. Its answers follow the recorded kube-apiserver 1.36 transcripts in the
//! shared `kube-api-transcripts` folder (status codes, `Status` bodies, reasons, details).
//!
//! # What it emulates
//! - Resources: core/v1 `namespaces` (`default`, `kube-system`, `kube-public`, `kube-node-lease`
//!   exist at start), `secrets`, `events`; `events.k8s.io/v1` `events` (the same objects as the
//!   core/v1 ones, converted field by field); `coordination.k8s.io/v1` `leases`;
//!   `apiextensions.k8s.io/v1` `customresourcedefinitions`; `apps/v1` `deployments`,
//!   `statefulsets` and `daemonsets` (stored only: generation and `/status`, no controller, so
//!   no ReplicaSets or Pods appear). Creating a CRD serves its custom
//!   resources (every served version, namespaced or cluster scope, `/status` when declared);
//!   deleting it removes the paths again (unregistered paths answer text/plain
//!   `404 page not found`).
//! - Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`
//!   (legacy documents; the aggregated v2 form is never offered, clients fall back).
//! - Verbs: get, list (label selectors `=`,`==`,`!=`,`in`,`notin`, exists, `!`; field selectors
//!   `metadata.name`/`metadata.namespace` plus the per-kind ones; `limit`/`continue`;
//!   all-namespaces lists), watch, create (generateName, dryRun), update, patch (merge, JSON
//!   patch incl. `test`, strategic merge on built-in kinds, server-side apply), delete
//!   (preconditions, propagation policies, finalizers), deletecollection.
//! - Object semantics: one global, monotonically increasing resourceVersion; uid (UUID v4);
//!   creationTimestamp; generation on CRs and CRDs (spec changes and deletion bump it);
//!   status subresource rules; Secret `stringData`; MicroTime precision checks (400);
//!   no-op writes keep the resourceVersion and emit no watch event; removing the last finalizer
//!   of a terminating object deletes it (DELETED carries a new RV and the previous state).
//! - Watches: replay from a bounded history ([`store::HISTORY_CAP`] events), then live events;
//!   synthetic ADDED events plus the `k8s.io/initial-events-end` bookmark for watches without
//!   RV and watch-lists; bookmarks shortly before `timeoutSeconds` (and about once a second on
//!   watch-lists after live events); too-old RVs answer 200 plus one `ERROR` 410 event.
//! - Garbage collection: background deletion of dependents whose owners are all gone,
//!   Foreground (dependents deleted, then the owner) and Orphan (ownerReferences stripped);
//!   namespace deletion (Terminating, contents deleted, then the namespace); CRD deletion.
//! - Test hooks: [`FakeApiServer::cut_watches`], [`FakeApiServer::compact`],
//!   [`FakeApiServer::request_log`] / [`FakeApiServer::clear_request_log`].
//!
//! # What a real API server does differently
//! - No authentication, authorization (RBAC), admission webhooks, API priority and fairness,
//!   TLS, protobuf/CBOR, Table output (`kubectl get` prints client-side columns) or
//!   PartialObjectMetadata responses.
//! - Validation is a small subset (names, generateName, ownerReference uids, Lease duration,
//!   Event namespace/eventTime/type, finalizers on terminating objects, MicroTime format). CRD
//!   OpenAPI schemas are not enforced and unknown fields are neither pruned nor warned about.
//! - Field ownership is simplified (see [`fields`]): leaf-level sets, atomic lists except
//!   list-maps, conflicts only between different manager names, timestamps set whenever an
//!   entry changes; apply on events.k8s.io uses core/v1 field names.
//! - LISTs are always served from the current state: `resourceVersion`/`resourceVersionMatch`
//!   only select between "current" and 410, and a continue token does not pin a snapshot.
//! - The watch cache is one global history; compaction is [`FakeApiServer::compact`] or the
//!   history cap. A lagging watcher is closed instead of being slowed down.
//! - GC runs right after the triggering write (the real controller is asynchronous but also
//!   fast); Foreground deletion does not wait for dependents' own finalizers; namespace
//!   deletion ignores `spec.finalizers`; a CRD's custom resources are removed regardless of
//!   their finalizers.
//! - CRDs are Established immediately at creation (the real server takes ~0.1 s) and no
//!   `kube-apiserver` managedFields entry is written for their status.

mod errors;
mod fields;
mod render;
mod select;
mod setup;
mod store;
mod watch;

pub use setup::{create_namespace, install_crd};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use errors::ApiError;
use render::Order;
use select::{FieldSelector, LabelSelector};
use store::{Ctx, GcJob, Lookup, PatchKind, ResourceDef, Store};

/// Largest request body accepted.
const BODY_LIMIT: usize = 32 * 1024 * 1024;
/// The most requests the request log keeps (oldest dropped first), so a long benchmark cannot
/// exhaust memory; the same cap as `kube-fault-proxy`'s log.
const LOG_CAP: usize = 200_000;

/// One request as this server answered it (see [`FakeApiServer::request_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection
    /// (`get` for discovery and other non-resource paths).
    pub verb: String,
    pub path: String,
    pub query: String,
    /// The status answered (for a watch: of the response that starts the stream).
    pub status: u16,
    pub user_agent: Option<String>,
    /// When the answer was ready (for a watch: when its stream began).
    pub at: SystemTime,
}

pub(crate) struct Shared {
    store: Mutex<Store>,
    log: Mutex<VecDeque<LoggedRequest>>,
    watch_cancel: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    open_watches: Arc<AtomicUsize>,
    addr: SocketAddr,
}

/// Locks never stay poisoned here: a panic while holding one is a bug in a test anyway, and
/// continuing with the data is more useful than cascading panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn lock_store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
    pub(crate) fn watch_token(&self) -> CancellationToken {
        lock(&self.watch_cancel).clone()
    }
}

/// The in-memory API server. Dropping it shuts the server down.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    gc: Option<JoinHandle<()>>,
}

fn now_seconds() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl FakeApiServer {
    /// Start on an ephemeral port of 127.0.0.1.
    #[allow(clippy::expect_used)]
    pub async fn start() -> FakeApiServer {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::start_on(addr)
            .await
            .expect("bind the fake API server on 127.0.0.1:0")
    }

    async fn start_on(addr: SocketAddr) -> std::io::Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, _) = broadcast::channel(65_536);
        let (gc_tx, mut gc_rx) = mpsc::unbounded_channel::<GcJob>();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(tx, gc_tx, &now_seconds())),
            log: Mutex::new(VecDeque::new()),
            watch_cancel: Mutex::new(shutdown.child_token()),
            shutdown: shutdown.clone(),
            open_watches: Arc::new(AtomicUsize::new(0)),
            addr,
        });
        let gc_shared = shared.clone();
        let gc_stop = shutdown.clone();
        let gc = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = gc_stop.cancelled() => break,
                    job = gc_rx.recv() => match job {
                        Some(job) => gc_shared.lock_store().run_gc(job, &now_seconds()),
                        None => break,
                    }
                }
            }
        });
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "fake API server stopped with an error");
            }
        });
        Ok(FakeApiServer {
            shared,
            addr,
            server: Some(server),
            gc: Some(gc),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server, default namespace `default`.
    #[allow(clippy::expect_used)]
    pub fn client(&self) -> kube::Client {
        let uri: http::Uri = self.url().parse().expect("the server URL is a valid URI");
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).expect("a plain-HTTP kube client can always be built")
    }

    /// A kubeconfig pointing at [`Self::url`] (no credentials: the fake does not authenticate).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            url = self.url()
        )
    }

    /// Close every open watch stream (clients see a clean end of stream and re-watch).
    pub fn cut_watches(&self) {
        let mut token = lock(&self.shared.watch_cancel);
        token.cancel();
        *token = self.shared.shutdown.child_token();
    }

    /// Make every resourceVersion issued so far too old: a watch from it gets 410 Expired.
    pub fn compact(&self) {
        self.shared.lock_store().compact();
    }

    /// Every request answered since the start or the last [`Self::clear_request_log`], oldest
    /// first (at most the last 200,000). A request is logged when its answer is ready, before it
    /// is sent; a watch when its stream begins. Unlike the log of `kube-fault-proxy`, this is
    /// what reached the API server: nothing a proxy answered itself, and requests whose client
    /// went away before the answer too.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// How many logged requests match `filter`, without copying the log (for polling a long one).
    pub fn count_requests(&self, filter: impl Fn(&LoggedRequest) -> bool) -> usize {
        lock(&self.shared.log).iter().filter(|r| filter(r)).count()
    }

    pub fn clear_request_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// Watch streams currently open.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Stop serving and wait (briefly) for the server task to end.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
        {
            tracing::warn!("fake API server did not stop within 5 s");
        }
        if let Some(gc) = self.gc.take() {
            gc.abort();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        if let Some(gc) = self.gc.take() {
            gc.abort();
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

enum Reply {
    Json(u16, Value, Order),
    Stream(Response),
    Text(u16, &'static str, String),
}

fn json_response(code: u16, body: String) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn error_reply(e: ApiError) -> Reply {
    if e.plain_404 {
        return Reply::Text(
            404,
            "text/plain; charset=utf-8",
            "404 page not found\n".to_owned(),
        );
    }
    Reply::Json(e.code, e.status_body(), Order::generic())
}

fn into_response(reply: Reply) -> Response {
    match reply {
        Reply::Json(code, v, order) => json_response(code, render::encode(&v, order)),
        Reply::Stream(r) => r,
        Reply::Text(code, ct, body) => Response::builder()
            .status(code)
            .header("content-type", ct)
            .header("cache-control", "no-cache, private")
            .header("x-content-type-options", "nosniff")
            .body(Body::from(body))
            .unwrap_or_else(|_| Response::new(Body::empty())),
    }
}

struct Req {
    method: http::Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    user_agent: Option<String>,
    /// `Accept: ...;as=PartialObjectMetadata[List]`: kube's metadata-only API.
    metadata_only: bool,
    body: axum::body::Bytes,
}

impl Req {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.param(key), Some("true") | Some("1"))
    }
    fn manager(&self) -> String {
        if let Some(m) = self.param("fieldManager").filter(|m| !m.is_empty()) {
            return m.to_owned();
        }
        match &self.user_agent {
            Some(ua) if !ua.is_empty() => ua.split('/').next().unwrap_or(ua).trim().to_owned(),
            _ => "unknown".to_owned(),
        }
    }
    fn ctx(&self) -> Ctx {
        Ctx {
            manager: self.manager(),
            dry_run: self.param("dryRun") == Some("All"),
            now: now_seconds(),
        }
    }
    fn media_type(&self) -> String {
        self.content_type
            .as_deref()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or("").to_owned();
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let user_agent = header(http::header::USER_AGENT);
    let metadata_only =
        header(http::header::ACCEPT).is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let method = parts.method;
    let query: Vec<(String, String)> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();

    let verb = verb(&method, &path, &query);
    let logged_method = method.as_str().to_owned();
    let (reply, path, user_agent) = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(body) => {
            let req = Req {
                method,
                path,
                query,
                content_type,
                user_agent,
                metadata_only,
                body,
            };
            (route(&shared, &req), req.path, req.user_agent)
        }
        Err(e) => (
            error_reply(ApiError::bad_request(format!(
                "unable to read the request body: {e}"
            ))),
            path,
            user_agent,
        ),
    };
    let response = into_response(reply);
    let entry = LoggedRequest {
        method: logged_method,
        verb: verb.to_owned(),
        path,
        query: raw_query,
        status: response.status().as_u16(),
        user_agent,
        at: SystemTime::now(),
    };
    let mut log = lock(&shared.log);
    if log.len() >= LOG_CAP {
        log.pop_front();
    }
    log.push_back(entry);
    drop(log);
    response
}

/// The Kubernetes verb of a request, as the request log records it (and as `kube-fault-proxy`
/// names it): GET of a collection is a list, with `watch=true` a watch; DELETE of a collection
/// is a deletecollection. Discovery and other non-resource GETs are `get`.
fn verb(method: &http::Method, path: &str, query: &[(String, String)]) -> &'static str {
    let watch = query
        .iter()
        .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    let named = match parse_path(path) {
        Target::Resource { name, .. } => name.is_some(),
        _ => true,
    };
    match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if !named => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// Where a path points.
enum Target {
    Version,
    ApiVersions,
    GroupList,
    Group(String),
    ResourceList(String, String),
    Resource {
        group: String,
        version: String,
        namespace: Option<String>,
        plural: String,
        name: Option<String>,
        sub: Option<String>,
    },
    Other,
}

fn parse_path(path: &str) -> Target {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Target::Version,
        ["api"] => return Target::ApiVersions,
        ["apis"] => return Target::GroupList,
        ["api", "v1"] => return Target::ResourceList(String::new(), "v1".into()),
        ["apis", g] => return Target::Group((*g).to_owned()),
        ["apis", g, v] => return Target::ResourceList((*g).to_owned(), (*v).to_owned()),
        ["api", v, rest @ ..] => (String::new(), (*v).to_owned(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_owned(), (*v).to_owned(), rest),
        _ => return Target::Other,
    };
    let s = |x: &&str| (*x).to_owned();
    let (namespace, plural, name, sub) = match rest {
        ["namespaces", ns, plural] if *plural != "status" && *plural != "finalize" => {
            (Some(s(ns)), s(plural), None, None)
        }
        ["namespaces", ns, plural, name] => (Some(s(ns)), s(plural), Some(s(name)), None),
        ["namespaces", ns, plural, name, sub] => {
            (Some(s(ns)), s(plural), Some(s(name)), Some(s(sub)))
        }
        [plural] => (None, s(plural), None, None),
        [plural, name] => (None, s(plural), Some(s(name)), None),
        [plural, name, sub] => (None, s(plural), Some(s(name)), Some(s(sub))),
        _ => return Target::Other,
    };
    Target::Resource {
        group,
        version,
        namespace,
        plural,
        name,
        sub,
    }
}

fn route(shared: &Arc<Shared>, req: &Req) -> Reply {
    let reply = match parse_path(&req.path) {
        Target::Version => Ok(version_reply()),
        Target::ApiVersions => Ok(Reply::Json(
            200,
            json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
            }),
            Order::Typed(&[
                "kind",
                "apiVersion",
                "versions",
                "serverAddressByClientCIDRs",
            ]),
        )),
        Target::GroupList => Ok(group_list(&shared.lock_store())),
        Target::Group(g) => group_doc(&shared.lock_store(), &g),
        Target::ResourceList(g, v) => resource_list(&shared.lock_store(), &g, &v),
        Target::Other => match req.path.as_str() {
            "/healthz" | "/readyz" | "/livez" => {
                Ok(Reply::Text(200, "text/plain; charset=utf-8", "ok".into()))
            }
            _ => Err(ApiError::page_not_found()),
        },
        Target::Resource {
            group,
            version,
            namespace,
            plural,
            name,
            sub,
        } => {
            let def = match shared.lock_store().lookup(&group, &version, &plural) {
                Lookup::Found(d) => d,
                Lookup::UnknownResource => {
                    return error_reply(ApiError::resource_not_found());
                }
                Lookup::UnknownGroupVersion => {
                    return error_reply(ApiError::page_not_found());
                }
            };
            // A namespaced resource needs /namespaces/{ns}/ for object paths; a cluster-scoped one must not have it.
            let shape_ok = !matches!(
                (&namespace, def.namespaced, &name),
                (Some(_), false, _) | (None, true, Some(_))
            );
            let sub_ok = match sub.as_deref() {
                None => true,
                Some("status") => def.status_subresource,
                Some(_) => false,
            };
            if !shape_ok || !sub_ok {
                Err(ApiError::resource_not_found())
            } else {
                resource(shared, req, def, namespace, name, sub)
            }
        }
    };
    reply.unwrap_or_else(error_reply)
}

fn version_reply() -> Reply {
    let body = json!({
        "major": "1",
        "minor": "36",
        "emulationMajor": "1",
        "emulationMinor": "36",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "35",
        "gitVersion": "v1.36.2",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-11-23T08:42:10Z",
        "goVersion": "go1.27.3",
        "compiler": "gc",
        "platform": "linux/amd64",
    });
    // The real server pretty-prints /version itself and sends no trailing newline.
    let order = [
        "major",
        "minor",
        "emulationMajor",
        "emulationMinor",
        "minCompatibilityMajor",
        "minCompatibilityMinor",
        "gitVersion",
        "gitCommit",
        "gitTreeState",
        "buildDate",
        "goVersion",
        "compiler",
        "platform",
    ];
    let lines: Vec<String> = order
        .iter()
        .map(|k| {
            format!(
                "  \"{k}\": {}",
                body.get(*k).cloned().unwrap_or(Value::Null)
            )
        })
        .collect();
    Reply::Text(
        200,
        "application/json",
        format!("{{\n{}\n}}", lines.join(",\n")),
    )
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_entries(defs: &[Arc<ResourceDef>]) -> Vec<Value> {
    let mut out = Vec::new();
    for d in defs {
        let mut e = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": VERBS,
        });
        if !d.short_names.is_empty() {
            e["shortNames"] = json!(d.short_names);
        }
        out.push(e);
        if d.status_subresource {
            out.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    out
}

const DISCOVERY_ORDER: Order = Order::Typed(&[
    "kind",
    "apiVersion",
    "groupVersion",
    "name",
    "groups",
    "versions",
    "preferredVersion",
    "resources",
]);

fn group_versions(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for d in store.all_defs() {
        if d.group.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == d.group) {
            Some((_, vs)) => {
                if !vs.contains(&d.version) {
                    vs.push(d.version.clone());
                }
            }
            None => groups.push((d.group.clone(), vec![d.version.clone()])),
        }
    }
    groups
}

fn group_json(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": vs.clone(), "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

fn group_list(store: &Store) -> Reply {
    let groups: Vec<Value> = group_versions(store)
        .iter()
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    Reply::Json(
        200,
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
        DISCOVERY_ORDER,
    )
}

fn group_doc(store: &Store, group: &str) -> Result<Reply, ApiError> {
    let groups = group_versions(store);
    let (g, vs) = groups
        .iter()
        .find(|(g, _)| g == group)
        .ok_or_else(ApiError::page_not_found)?;
    let mut doc = group_json(g, vs);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Ok(Reply::Json(200, doc, DISCOVERY_ORDER))
}

fn resource_list(store: &Store, group: &str, version: &str) -> Result<Reply, ApiError> {
    let defs: Vec<Arc<ResourceDef>> = store
        .all_defs()
        .into_iter()
        .filter(|d| d.group == group && d.version == version)
        .collect();
    if defs.is_empty() {
        return Err(ApiError::page_not_found());
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut doc = json!({"kind": "APIResourceList", "groupVersion": gv, "resources": resource_entries(&defs)});
    if !group.is_empty() {
        doc["apiVersion"] = json!("v1");
    }
    Ok(Reply::Json(200, doc, DISCOVERY_ORDER))
}

fn parse_body(req: &Req) -> Result<Value, ApiError> {
    let mt = req.media_type();
    match mt.as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(&req.body).map_err(|e| {
            ApiError::bad_request(format!(
                "the object provided is unrecognized: couldn't get version/kind; json parse error: {e}"
            ))
        }),
        "application/yaml" => {
            serde_yaml::from_slice(&req.body).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        }
        _ => Err(ApiError::unsupported_media_type(
            "application/json, application/yaml, application/vnd.kubernetes.protobuf",
        )),
    }
}

fn selectors(req: &Req, def: &ResourceDef) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or(""), &|l| {
        def.field_pointer(l)
    })
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn resource(
    shared: &Arc<Shared>,
    req: &Req,
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
) -> Result<Reply, ApiError> {
    let ns = namespace.clone().unwrap_or_default();
    let order = def.order();
    let ctx = req.ctx();
    match (&req.method, name) {
        (&http::Method::GET, None) => {
            if req.flag("watch") {
                return watch_reply(shared, req, def, namespace);
            }
            list(&shared.lock_store(), req, &def, namespace.as_deref())
        }
        (&http::Method::GET, Some(name)) => {
            let store = shared.lock_store();
            let obj = store
                .get_obj(&def, &ns, &name)
                .ok_or_else(|| ApiError::not_found(&def, &name))?;
            if req.metadata_only {
                return Ok(Reply::Json(200, partial_of(&def, obj), Order::generic()));
            }
            Ok(Reply::Json(200, Store::view(&def, obj), order))
        }
        (&http::Method::POST, None) => {
            let body = parse_body(req)?;
            let v = shared.lock_store().create(&ctx, &def, &ns, body)?;
            Ok(Reply::Json(201, v, order))
        }
        (&http::Method::PUT, Some(name)) => {
            let body = parse_body(req)?;
            let v = shared
                .lock_store()
                .replace(&ctx, &def, &ns, &name, sub.as_deref(), body)?;
            Ok(Reply::Json(200, v, order))
        }
        (&http::Method::PATCH, Some(name)) => {
            let kind = match req.media_type().as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                "application/strategic-merge-patch+json" if def.custom() => {
                    return Err(ApiError::unsupported_media_type(
                        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/apply-patch+yaml" => PatchKind::Apply,
                _ => {
                    return Err(ApiError::new(
                        415,
                        Some("UnsupportedMediaType"),
                        "415: Unsupported Media Type",
                        Some(json!({})),
                    ));
                }
            };
            let force = req.flag("force");
            if force && kind != PatchKind::Apply {
                return Err(ApiError::invalid_options(
                    "PatchOptions",
                    &[(
                        "FieldValueForbidden",
                        "force",
                        "Forbidden: may not be specified for non-apply patch",
                    )],
                ));
            }
            if kind == PatchKind::Apply && req.param("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::invalid_options(
                    "PatchOptions",
                    &[(
                        "FieldValueRequired",
                        "fieldManager",
                        "Required value: is required for apply patch",
                    )],
                ));
            }
            let (code, v) = shared.lock_store().patch(
                &ctx,
                &def,
                &ns,
                &name,
                sub.as_deref(),
                kind,
                &req.body,
                force,
            )?;
            Ok(Reply::Json(code, v, order))
        }
        (&http::Method::DELETE, Some(name)) => {
            let opts = delete_options(req)?;
            let v = shared.lock_store().delete(
                &ctx,
                &def,
                &ns,
                &name,
                &opts,
                req.param("propagationPolicy"),
            )?;
            let order = if v.get("kind").and_then(Value::as_str) == Some("Status") {
                Order::generic()
            } else {
                order
            };
            Ok(Reply::Json(200, v, order))
        }
        (&http::Method::DELETE, None) => {
            let opts = delete_options(req)?;
            let (labels, fields) = selectors(req, &def)?;
            let mut store = shared.lock_store();
            let targets: Vec<(String, String, Value)> = store
                .iter_objects(&def, namespace.as_deref())
                .filter(|(_, o)| labels.matches(o) && fields.matches(o))
                .map(|(k, o)| (k.0.clone(), k.1.clone(), o.clone()))
                .collect();
            let mut items = Vec::new();
            for (ns, name, obj) in targets {
                store.delete(
                    &ctx,
                    &def,
                    &ns,
                    &name,
                    &opts,
                    req.param("propagationPolicy"),
                )?;
                items.push(list_item(&def, &obj));
            }
            let body = json!({
                "kind": def.list_kind,
                "apiVersion": def.api_version(),
                "metadata": {"resourceVersion": store.rv.to_string()},
                "items": items,
            });
            Ok(Reply::Json(200, body, order))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn delete_options(req: &Req) -> Result<Value, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))
}

/// The PartialObjectMetadata form of an object (metadata-only requests).
pub(crate) fn partial(view: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": view.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// The PartialObjectMetadata form of a stored object. Only the events.k8s.io view changes the
/// metadata; the others are the stored metadata, so the object (a Secret's data, say) is not
/// copied to take it.
pub(crate) fn partial_of(def: &ResourceDef, stored: &Value) -> Value {
    match def.flavor {
        store::Flavor::EventV1 => partial(&Store::view(def, stored)),
        _ => partial(stored),
    }
}

fn list_item(def: &ResourceDef, stored: &Value) -> Value {
    let mut v = Store::view(def, stored);
    // Typed lists leave out the items' kind/apiVersion; unstructured (CR) lists keep them.
    if !def.custom()
        && let Some(m) = v.as_object_mut()
    {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

/// How the list key of `k` (`namespace/name`, or `name` for a cluster-scoped resource)
/// compares with `s`, byte by byte as strings compare.
fn key_cmp(namespaced: bool, k: &(String, String), s: &str) -> std::cmp::Ordering {
    let parts: [&[u8]; 3] = match namespaced {
        true => [k.0.as_bytes(), b"/", k.1.as_bytes()],
        false => [b"", b"", k.1.as_bytes()],
    };
    parts.iter().flat_map(|p| p.iter()).cmp(s.as_bytes().iter())
}

fn encode_continue(rv: u64, start: &str) -> String {
    use base64::Engine as _;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn list_options_errors(req: &Req, watch: bool) -> Result<(), ApiError> {
    let mut causes: Vec<(&str, &str, &str)> = Vec::new();
    let rv_match = req.param("resourceVersionMatch").filter(|s| !s.is_empty());
    let has_rv = req.param("resourceVersion").is_some_and(|s| !s.is_empty());
    let sie = req.param("sendInitialEvents").is_some();
    if watch {
        if sie && rv_match != Some("NotOlderThan") {
            causes.push((
                "FieldValueForbidden",
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
    } else {
        if rv_match.is_some() && !has_rv {
            causes.push((
                "FieldValueForbidden",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if sie {
            causes.push((
                "FieldValueForbidden",
                "sendInitialEvents",
                "Forbidden: sendInitialEvents is forbidden for list",
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_options("ListOptions", &causes))
    }
}

fn list(
    store: &Store,
    req: &Req,
    def: &Arc<ResourceDef>,
    namespace: Option<&str>,
) -> Result<Reply, ApiError> {
    list_options_errors(req, false)?;
    let (labels, fields) = selectors(req, def)?;
    if req.param("resourceVersionMatch") == Some("Exact")
        && let Some(rv) = req
            .param("resourceVersion")
            .and_then(|r| r.parse::<u64>().ok())
        && rv < store.floor
    {
        return Err(ApiError::new(
            410,
            Some("Expired"),
            "The resourceVersion for the provided list is too old.",
            None,
        ));
    }
    let mut list_rv = store.rv;
    let mut start_after: Option<String> = None;
    if let Some(token) = req.param("continue").filter(|t| !t.is_empty()) {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim_end_matches('='))
            .map_err(|e| ApiError::bad_request(format!("invalid continue token: {e}")))?;
        let parsed: Value = serde_json::from_slice(&decoded).map_err(|e| {
            ApiError::bad_request(format!(
                "invalid continue token: continue key is not valid: {e}"
            ))
        })?;
        let rv = parsed.get("rv").and_then(Value::as_i64).unwrap_or(0);
        let start = parsed
            .get("start")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim_end_matches('\u{0}')
            .to_owned();
        if rv <= 0 || (rv as u64) < store.floor {
            let mut e = ApiError::new(
                410,
                Some("Expired"),
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                None,
            );
            let fresh = {
                use base64::Engine as _;
                let t = json!({"v": "meta.k8s.io/v1", "rv": -1, "start": format!("{start}\u{0}")});
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.to_string())
            };
            e.metadata = json!({"continue": fresh});
            return Err(e);
        }
        list_rv = rv as u64;
        start_after = Some(start);
    }
    let limit = req
        .param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let key_of = |k: &(String, String)| {
        if def.namespaced {
            format!("{}/{}", k.0, k.1)
        } else {
            k.1.clone()
        }
    };
    let mut items = Vec::new();
    let mut last_key = None;
    let mut remaining = 0usize;
    let mut more = false;
    for (k, obj) in store.iter_objects(def, namespace) {
        // Compared without building the key: every page walks the whole collection.
        if let Some(s) = &start_after
            && key_cmp(def.namespaced, k, s) != std::cmp::Ordering::Greater
        {
            continue;
        }
        if !(labels.matches(obj) && fields.matches(obj)) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            more = true;
            remaining += 1;
            if !(labels.is_empty() && fields.is_empty()) {
                break;
            }
            continue;
        }
        if req.metadata_only {
            items.push(partial_of(def, obj));
        } else {
            items.push(list_item(def, obj));
        }
        last_key = Some(key_of(k));
    }
    let mut meta = serde_json::Map::new();
    meta.insert("resourceVersion".into(), json!(list_rv.to_string()));
    if more && let Some(k) = &last_key {
        meta.insert("continue".into(), json!(encode_continue(list_rv, k)));
        if labels.is_empty() && fields.is_empty() {
            meta.insert("remainingItemCount".into(), json!(remaining));
        }
    } else if def.custom() {
        meta.insert("continue".into(), json!(""));
    }
    if req.metadata_only {
        let body = json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": Value::Object(meta),
            // Moved in: `json!` would serialize a copy of every item.
            "items": Value::Array(items),
        });
        return Ok(Reply::Json(200, body, Order::generic()));
    }
    let body = json!({
        "kind": def.list_kind,
        "apiVersion": def.api_version(),
        "metadata": Value::Object(meta),
        "items": Value::Array(items),
    });
    Ok(Reply::Json(200, body, def.order()))
}

fn watch_reply(
    shared: &Arc<Shared>,
    req: &Req,
    def: Arc<ResourceDef>,
    namespace: Option<String>,
) -> Result<Reply, ApiError> {
    list_options_errors(req, true)?;
    let (labels, fields) = selectors(req, &def)?;
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let params = watch::WatchParams {
        resource_version: req.param("resourceVersion").map(str::to_owned),
        bookmarks: req.flag("allowWatchBookmarks"),
        timeout,
        send_initial_events: req.flag("sendInitialEvents"),
        metadata_only: req.metadata_only,
        labels,
        fields,
    };
    watch::start(shared, def, namespace, params).map(Reply::Stream)
}

#[cfg(test)]
mod list_key_tests {
    use super::key_cmp;

    #[test]
    fn list_keys_compare_as_their_text() {
        for (ns, name, s) in [
            ("a", "x", "a/x"),
            ("a", "x", "a/y"),
            ("a-b", "y", "a/x"),
            ("a", "x", "a-b/y"),
            ("ns", "n", "ns/"),
            ("ns", "n", "ns/n0"),
            ("ns", "n0", "ns/n"),
            ("", "", ""),
        ] {
            let key = (ns.to_string(), name.to_string());
            let text = format!("{ns}/{name}");
            assert_eq!(
                key_cmp(true, &key, s),
                text.as_str().cmp(s),
                "{text} vs {s}"
            );
            assert_eq!(key_cmp(false, &key, s), name.cmp(s), "{name} vs {s}");
        }
    }
}
