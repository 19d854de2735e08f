//! A fault-injecting, request-logging HTTP proxy in front of a Kubernetes API server, for tests.
//!
//! The operator's tests check how it behaves when the API answers a write with a conflict or a
//! server error, and which requests it sends. Doing that inside the in-memory API server would
//! only work against that server; doing it here works in front of whichever API server is in use:
//! the in-memory one (`fake-apiserver`) or a real cluster from `KUBECONFIG`.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` (plain HTTP, no authentication) and forwards
//! every request through the upstream `kube::Client` it is given, so the upstream's TLS and
//! credentials are kube's business and never reach the proxied clients. Responses, watch streams
//! included, are streamed through without buffering. On the way it
//!
//! - answers requests matching an injected [`Fault`] itself, with a `metav1.Status` body like the
//!   API server's own errors, without forwarding them (a faulted write changes nothing);
//! - records every request as a [`LoggedRequest`] (Kubernetes verb, path, query, status, ...);
//! - ends every watch stream it relays on [`FaultProxy::cut_watches`] (clients see a clean end
//!   of stream and watch again);
//! - plays an API server that cannot be reached while [`FaultProxy::set_unavailable`] is on:
//!   open watches end and every request is answered 502 without being forwarded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures::StreamExt;
use http::header::{self, HeaderName};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The most requests the log keeps (oldest dropped first), so a long benchmark cannot exhaust memory.
const LOG_CAP: usize = 200_000;
/// Largest request body forwarded.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// One request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    pub path: String,
    pub query: String,
    /// The status the client got (an injected fault's, or the upstream's).
    pub status: u16,
    /// The Content-Type of PATCH requests (it selects the patch strategy).
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    /// When the answer's status was known (for a watch: when its stream began).
    pub at: SystemTime,
}

/// Fail the next `times` requests whose method matches (any when `None`) and whose
/// `path?query` contains `path_contains`, answering `status` with a proper `Status` body.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Option<http::Method>,
    pub path_contains: String,
    pub status: u16,
    pub times: usize,
}

struct Shared {
    upstream: kube::Client,
    log: Mutex<VecDeque<LoggedRequest>>,
    /// Each fault with the matching requests it still lets through first.
    faults: Mutex<Vec<(Fault, usize)>>,
    /// Cancelled (and replaced) by [`FaultProxy::cut_watches`]; a child of `shutdown`.
    watch_cancel: Mutex<CancellationToken>,
    /// While set, the API server is "unreachable": every request gets a 503.
    unavailable: AtomicBool,
    shutdown: CancellationToken,
}

/// Locks never stay poisoned here: a panic while holding one is a bug in a test anyway, and
/// continuing with the data is more useful than cascading panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running proxy. Dropping it stops it (and ends the watches it relays).
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    client: kube::Client,
    server: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts the proxy on an ephemeral port of 127.0.0.1 in front of `upstream`.
    pub async fn start(upstream: kube::Client) -> std::io::Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let uri: http::Uri = format!("http://{addr}")
            .parse()
            .map_err(std::io::Error::other)?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = upstream.default_namespace().to_owned();
        let client = kube::Client::try_from(config).map_err(std::io::Error::other)?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream,
            log: Mutex::new(VecDeque::new()),
            faults: Mutex::new(Vec::new()),
            watch_cancel: Mutex::new(shutdown.child_token()),
            unavailable: AtomicBool::new(false),
            shutdown: shutdown.clone(),
        });
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "kube fault proxy stopped with an error");
            }
        });
        Ok(FaultProxy {
            shared,
            addr,
            client,
            server: Some(server),
        })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client that talks to the upstream through this proxy (the upstream's default namespace).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig pointing at [`Self::url`], for a process of its own (`kubectl`, the
    /// operator binary). No credentials: the proxy adds the upstream's.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: {url}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\n    namespace: {namespace}\ncurrent-context: proxy\nusers:\n- name: proxy\n  user: {{}}\n",
            url = self.url(),
            namespace = self.client.default_namespace(),
        )
    }

    /// Every request since the start or the last [`Self::clear_request_log`], oldest first.
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

    /// Adds a fault; faults are tried in the order they were injected.
    pub fn inject_fault(&self, fault: Fault) {
        self.inject_fault_after(0, fault);
    }

    /// Adds a fault that lets the first `skip` requests it matches through (to fail, say, the
    /// second status write of a flow and not the first).
    pub fn inject_fault_after(&self, skip: usize, fault: Fault) {
        lock(&self.shared.faults).push((fault, skip));
    }

    /// Drops every injected fault that has not fired yet.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Ends every watch stream relayed so far (clients see a clean end of stream and re-watch).
    pub fn cut_watches(&self) {
        let mut token = lock(&self.shared.watch_cancel);
        token.cancel();
        *token = self.shared.shutdown.child_token();
    }

    /// Makes the API server unreachable (`true`) or reachable again (`false`). While it is
    /// unreachable every request, watches included, is answered `502 Bad Gateway` without
    /// being forwarded, as by a load balancer that cannot reach the API server; turning it on
    /// also ends every open watch, as a lost connection would. Injected faults keep their
    /// remaining count for afterwards. Not 503: kube-rs retries 503 (and 429, 504) inside the
    /// client for up to 15 attempts with doubling delays, minutes in all, so the caller would
    /// see a slow request rather than an unreachable server; it fails a 502 at once, as it
    /// does a refused connection.
    pub fn set_unavailable(&self, unavailable: bool) {
        let was = self.shared.unavailable.swap(unavailable, Ordering::SeqCst);
        if unavailable && !was {
            self.cut_watches();
        }
    }

    /// Whether [`Self::set_unavailable`] is on.
    pub fn is_unavailable(&self) -> bool {
        self.shared.unavailable.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), or that the upstream client sets itself.
const NOT_FORWARDED: [HeaderName; 7] = [
    header::CONNECTION,
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
];

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let verb = verb(&parts.method, &path, &query);
    let header = |name: HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(header::CONTENT_TYPE);
    let user_agent = header(header::USER_AGENT);
    let method = parts.method.clone();

    let response = if shared.unavailable.load(Ordering::SeqCst) {
        status_response(
            502,
            "kube fault proxy: the API server is unreachable".into(),
        )
    } else {
        match take_fault(&shared, &method, &path, &query) {
            Some(code) => status_response(code, format!("injected fault: {code}")),
            None => forward(&shared, parts, body, verb == "watch").await,
        }
    };
    let mut log = lock(&shared.log);
    if log.len() >= LOG_CAP {
        log.pop_front();
    }
    log.push_back(LoggedRequest {
        method: method.as_str().to_owned(),
        verb: verb.to_owned(),
        path,
        query,
        status: response.status().as_u16(),
        content_type: (method == http::Method::PATCH)
            .then_some(content_type)
            .flatten(),
        user_agent,
        at: SystemTime::now(),
    });
    response
}

/// The status of the first fault matching this request, counting it down.
fn take_fault(shared: &Shared, method: &http::Method, path: &str, query: &str) -> Option<u16> {
    let target = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let mut faults = lock(&shared.faults);
    let (hit, skip) = faults.iter_mut().find(|(f, _)| {
        f.times > 0
            && f.method.as_ref().is_none_or(|m| m == method)
            && target.contains(&f.path_contains)
    })?;
    if *skip > 0 {
        *skip -= 1;
        return None;
    }
    hit.times -= 1;
    Some(hit.status)
}

/// Sends the request upstream and relays the answer; a watch's body ends early on
/// [`FaultProxy::cut_watches`].
async fn forward(
    shared: &Shared,
    parts: http::request::Parts,
    body: Body,
    watch: bool,
) -> Response {
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(body) => body,
        Err(e) => return status_response(400, format!("unable to read the request body: {e}")),
    };
    let mut upstream_req = http::Request::new(kube::client::Body::from(body));
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = match parts.uri.path_and_query() {
        Some(pq) => http::Uri::from(pq.clone()),
        None => http::Uri::from_static("/"),
    };
    let mut headers = parts.headers;
    for name in &NOT_FORWARDED {
        headers.remove(name);
    }
    *upstream_req.headers_mut() = headers;
    // Taken before sending, so a watch opened before a cut ends with that cut.
    let cut = watch.then(|| lock(&shared.watch_cancel).clone());
    let upstream = match shared.upstream.send(upstream_req).await {
        Ok(response) => response,
        Err(e) => return status_response(502, format!("kube fault proxy: upstream: {e}")),
    };
    let (mut parts, body) = upstream.into_parts();
    for name in [header::CONNECTION, header::TRANSFER_ENCODING] {
        parts.headers.remove(name);
    }
    let body = match cut {
        Some(cut) => Body::from_stream(
            Body::new(body)
                .into_data_stream()
                .take_until(cut.cancelled_owned()),
        ),
        None => Body::new(body),
    };
    Response::from_parts(parts, body)
}

/// A `metav1.Status` failure, as the API server answers errors (fields in its order).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    kind: &'static str,
    api_version: &'static str,
    metadata: serde_json::Value,
    status: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
    code: u16,
}

fn status_response(code: u16, message: String) -> Response {
    let reason = match code {
        400 => Some("BadRequest"),
        401 => Some("Unauthorized"),
        403 => Some("Forbidden"),
        404 => Some("NotFound"),
        405 => Some("MethodNotAllowed"),
        406 => Some("NotAcceptable"),
        409 => Some("Conflict"),
        410 => Some("Expired"),
        415 => Some("UnsupportedMediaType"),
        422 => Some("Invalid"),
        429 => Some("TooManyRequests"),
        500 => Some("InternalError"),
        502 => Some("BadGateway"),
        503 => Some("ServiceUnavailable"),
        504 => Some("Timeout"),
        _ => None,
    };
    let details = matches!(code, 429 | 503).then(|| serde_json::json!({"retryAfterSeconds": 1}));
    let status = Status {
        kind: "Status",
        api_version: "v1",
        metadata: serde_json::json!({}),
        status: "Failure",
        message,
        reason,
        details,
        code,
    };
    let body = serde_json::to_vec(&status).unwrap_or_default();
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The Kubernetes verb of a request: a resource path names an object when a name follows the
/// resource (after an optional `namespaces/{ns}`); `/api/v1/namespaces/{ns}` names a namespace.
fn verb(method: &http::Method, path: &str, query: &str) -> &'static str {
    let watch = url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let resource = match segments.as_slice() {
        ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] => rest,
        _ => &[],
    };
    let named = match resource {
        ["namespaces", _, plural, rest @ ..] if *plural != "status" && *plural != "finalize" => {
            !rest.is_empty()
        }
        [_, _, ..] => true,
        _ => false,
    };
    match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if !resource.is_empty() && !named => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_follow_the_path_shape() {
        let cases = [
            ("GET", "/api/v1/namespaces/ns/secrets", "", "list"),
            ("GET", "/api/v1/namespaces/ns/secrets/a", "", "get"),
            (
                "GET",
                "/api/v1/namespaces/ns/secrets",
                "watch=true",
                "watch",
            ),
            ("GET", "/api/v1/namespaces/ns", "", "get"),
            ("GET", "/api/v1/namespaces", "", "list"),
            ("GET", "/apis/g.io/v1/widgets", "", "list"),
            ("GET", "/apis/g.io/v1", "", "get"),
            ("GET", "/version", "", "get"),
            ("POST", "/api/v1/namespaces/ns/secrets", "", "create"),
            ("PUT", "/api/v1/namespaces/ns/secrets/a", "", "update"),
            (
                "PATCH",
                "/apis/g.io/v1/namespaces/ns/widgets/a/status",
                "",
                "patch",
            ),
            ("DELETE", "/api/v1/namespaces/ns/secrets/a", "", "delete"),
            (
                "DELETE",
                "/api/v1/namespaces/ns/secrets",
                "",
                "deletecollection",
            ),
            ("DELETE", "/api/v1/namespaces/ns", "", "delete"),
        ];
        for (method, path, query, want) in cases {
            let method = http::Method::from_bytes(method.as_bytes()).expect("method");
            assert_eq!(verb(&method, path, query), want, "{method} {path}?{query}");
        }
    }
}
