//! A tiny in-process Kubernetes API for the web targets: one client `team-a/demo` whose
//! published link is [`LINK`], its client secret, and nothing else. It counts the requests, so a
//! target can assert that an unauthenticated request caused none.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::json;

use crate::{
    clock::Clock,
    consent::StateKey,
    controller::{Context, Settings},
    leader::Leadership,
    metrics::Metrics,
    resource::GoToOAuthClient,
    validation::Defaults,
};

pub(crate) const NAMESPACE: &str = "team-a";
pub(crate) const NAME: &str = "demo";
pub(crate) const UID: &str = "0b6f6f7e-1d5c-4b7a-9a59-8f0c0a8d6f11";
pub(crate) const CLIENT_ID: &str = "a20abc4f-868a-4339-934f-4da2d788d0aa";
/// The published link token (43 characters, as the operator makes them).
pub(crate) const LINK: &str = "Lk9x2mQe7TbV4cRw1ZsYh8NfJ3uGpA6dK0oEiWqXlBn";
/// The clock of the fuzzed context (states expire relative to it).
pub(crate) const NOW: i64 = 1_800_000_000;

pub(crate) fn client_object() -> GoToOAuthClient {
    serde_json::from_value(json!({
        "apiVersion": "goto-oauth.dev/v1alpha1",
        "kind": "GoToOAuthClient",
        "metadata": {
            "name": NAME, "namespace": NAMESPACE, "uid": UID, "resourceVersion": "7",
        },
        "spec": {
            "clientId": CLIENT_ID,
            "clientSecretRef": {"name": "creds"},
            "displayName": "Payroll sync",
        },
        "status": {
            "authorizationUrl": format!("http://127.0.0.1:8080/authorize/{NAMESPACE}/{NAME}/{LINK}"),
        },
    }))
    .expect("a valid client")
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
        .expect("a response")
}

fn not_found() -> Response<Body> {
    reply(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// Answers like an API server holding the one client and its client secret.
fn answer(request: &Request<Body>) -> Response<Body> {
    let path = request.uri().path();
    let client_path =
        format!("/apis/goto-oauth.dev/v1alpha1/namespaces/{NAMESPACE}/gotooauthclients/{NAME}");
    let object = serde_json::to_value(client_object()).unwrap_or_default();
    match (request.method(), path) {
        (&Method::GET, p) if p == client_path => reply(StatusCode::OK, object),
        (&Method::PATCH | &Method::PUT, p) if p == format!("{client_path}/status") => {
            reply(StatusCode::OK, object)
        }
        (&Method::GET, p) if p == format!("/api/v1/namespaces/{NAMESPACE}/secrets/creds") => reply(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "creds", "namespace": NAMESPACE},
                   "data": {"clientSecret": "c2VjcmV0LXNlY3JldC1zZWNyZXQ="}}),
        ),
        _ => not_found(),
    }
}

/// A context whose API is [`answer`], and the count of API requests it received.
pub(crate) fn context(key: &StateKey) -> (Arc<Context>, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let service = tower::service_fn(move |request: Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let response = answer(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let client = kube::Client::new(service, "default");
    let settings = Settings {
        defaults: Defaults {
            public_url: "http://127.0.0.1:8080".parse().expect("a URL"),
            authorize_url: "https://authentication.logmeininc.com/oauth/authorize"
                .parse()
                .expect("a URL"),
            // Nothing listens there: a code exchange fails at once, without the network.
            token_url: "http://127.0.0.1:9/oauth/token".parse().expect("a URL"),
            allowed_hosts: Vec::new(),
        },
        token_rate_limit: 1000,
        max_concurrent_refreshes: 1,
        token_timeout: std::time::Duration::from_secs(2),
        namespaces: Vec::new(),
        reporter_instance: None,
    };
    let ctx = Context::new(
        client,
        settings,
        Arc::new(Metrics::default()),
        key.clone(),
        Clock::manual(jiff::Timestamp::from_second(NOW).expect("a time")),
        Leadership::always(),
    )
    .expect("a context");
    ctx.links.apply(&client_object());
    (ctx, requests)
}

pub(crate) fn requests(counter: &AtomicUsize) -> usize {
    counter.load(Ordering::SeqCst)
}
