//! The browser-facing endpoint: `GET /authorize/{namespace}/{name}/{link}` ([`authorize`]) and
//! `GET /callback` ([`callback`]), with the request bounds and security headers every response
//! gets, and the pages ([`pages`]) a GoTo admin sees.
//!
//! A GoTo admin (usually not a Kubernetes user) opens the shareable link, is sent to GoTo's
//! consent page and comes back to the callback, which exchanges the one-time code and stores the
//! tokens. Every replica serves this; all state travels through the API server (the client's
//! status) and the signed `state`, so a callback works on any replica. Every outcome is a
//! readable page; nothing a browser sends is reflected unescaped, and no token, code or secret
//! ever reaches a page or a log line.

mod authorize;
mod callback;
pub mod pages;
pub mod server;

use std::sync::Arc;

use axum::{
    Router,
    extract::Request,
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use axum_extra::extract::CookieJar;

use crate::{conditions::Reason, controller::Context, controller::ObjectKeys};
use pages::{ErrorPage, error_page, security_headers};

/// The cookie that binds a `state` to the browser that opened the link.
pub const BINDING_COOKIE: &str = "goto_oauth_binding";
/// Longest request target accepted (codes are long, but not this long).
pub const MAX_URI_LENGTH: usize = 8192;

/// The router for `--listen`.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route(
            "/authorize/{namespace}/{name}/{link}",
            get(authorize::authorize),
        )
        .route("/callback", get(callback::callback))
        .fallback(not_found)
        .layer(middleware::from_fn(guard))
        .with_state(ctx)
}

/// Bounds the request and adds security headers to every response.
async fn guard(request: Request, next: Next) -> Response {
    let too_long = request
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().len() > MAX_URI_LENGTH);
    let mut response = if too_long {
        page(
            StatusCode::URI_TOO_LONG,
            &ErrorPage {
                title: "Request too long",
                what_happened: "The address you opened is longer than any valid authorization link.",
                what_to_do: "Open the authorization link you were sent again, exactly as it was sent.",
                namespace: None,
                name: None,
                reference: None,
            },
        )
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        page(
            StatusCode::METHOD_NOT_ALLOWED,
            &ErrorPage {
                title: "Method not allowed",
                what_happened: "This endpoint only serves links opened in a browser.",
                what_to_do: "Open the authorization link you were sent in your browser.",
                namespace: None,
                name: None,
                reference: None,
            },
        )
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    for (name, value) in security_headers() {
        headers.insert(name, value);
    }
    response
}

fn page(status: StatusCode, error: &ErrorPage) -> Response {
    html(status, error_page(error))
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        &ErrorPage {
            title: "Not found",
            what_happened: "There is nothing at this address.",
            what_to_do: "Open the authorization link you were sent, exactly as it was sent.",
            namespace: None,
            name: None,
            reference: None,
        },
    )
}

fn invalid_link() -> Response {
    page(
        StatusCode::NOT_FOUND,
        &ErrorPage {
            title: "This authorization link is not valid",
            what_happened: "The link is unknown, was already used, or was replaced by a newer one.",
            what_to_do: "Ask the person who sent it for the current authorization link.",
            namespace: None,
            name: None,
            reference: None,
        },
    )
}

fn server_error(keys: Option<&ObjectKeys>) -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        &ErrorPage {
            title: "Temporarily unavailable",
            what_happened: "The operator could not reach the Kubernetes API to process this request.",
            what_to_do: "Wait a minute and open the authorization link again.",
            namespace: keys.map(|k| k.namespace.as_str()),
            name: keys.map(|k| k.name.as_str()),
            reference: None,
        },
    )
}

/// An error page about one client.
fn client_page(
    keys: &ObjectKeys,
    status: StatusCode,
    title: &str,
    what_happened: &str,
    what_to_do: &str,
    reference: Reason,
) -> Response {
    page(
        status,
        &ErrorPage {
            title,
            what_happened,
            what_to_do,
            namespace: Some(&keys.namespace),
            name: Some(&keys.name),
            reference: Some(reference.as_str()),
        },
    )
}

/// The binding cookie's value, when it has the shape the operator gives it.
fn binding_cookie(jar: &CookieJar) -> Option<String> {
    jar.get(BINDING_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|v| {
            (16..=128).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}
