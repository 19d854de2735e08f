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
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use axum_extra::extract::CookieJar;
use url::Url;

use crate::{
    cli::is_loopback_host, conditions::Reason, controller::Context, controller::ObjectKeys,
};
use pages::{ErrorPage, error_page, security_headers};

/// The cookie that binds a `state` to the browser that opened the link.
pub const BINDING_COOKIE: &str = "goto_oauth_binding";
/// Its name over https: the `__Host-` prefix makes browsers refuse it unless it is Secure,
/// has `Path=/` and no `Domain`, so no sibling host can plant or overwrite it.
pub const HOST_BINDING_COOKIE: &str = "__Host-goto_oauth_binding";
/// How long browsers must use https only for the operator's host, once seen over https.
const HSTS: &str = "max-age=31536000";
/// Longest request target accepted (codes are long, but not this long).
pub const MAX_URI_LENGTH: usize = 8192;

/// The router for `--listen`.
pub fn router(ctx: Arc<Context>) -> Router {
    let hsts = hsts(&ctx.settings.defaults.public_url);
    Router::new()
        .route(
            "/authorize/{namespace}/{name}/{link}",
            get(authorize::authorize),
        )
        .route("/callback", get(callback::callback))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(hsts, guard))
        .with_state(ctx)
}

/// `Strict-Transport-Security` when the operator is reached over https.
fn hsts(public_url: &Url) -> Option<HeaderValue> {
    (public_url.scheme() == "https").then(|| HeaderValue::from_static(HSTS))
}

/// How the binding cookie is named and flagged for a public URL: `Secure` with the `__Host-`
/// prefix everywhere but on a loopback development URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CookiePolicy {
    pub(crate) name: &'static str,
    pub(crate) secure: bool,
}

pub(crate) fn cookie_policy(public_url: &Url) -> CookiePolicy {
    if is_loopback_host(public_url) {
        CookiePolicy {
            name: BINDING_COOKIE,
            secure: false,
        }
    } else {
        CookiePolicy {
            name: HOST_BINDING_COOKIE,
            secure: true,
        }
    }
}

/// Bounds the request and adds security headers to every response.
async fn guard(State(hsts): State<Option<HeaderValue>>, request: Request, next: Next) -> Response {
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
                application: None,
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
                application: None,
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
    if let Some(hsts) = hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts);
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
            application: None,
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
            application: None,
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
            what_happened: "This service could not reach its storage to process this request. Nothing was changed.",
            what_to_do: "Wait a minute and open the authorization link again.",
            application: None,
            namespace: keys.map(|k| k.namespace.as_str()),
            name: keys.map(|k| k.name.as_str()),
            reference: None,
        },
    )
}

/// An error page about one client; `application` is its display name when the client was read.
fn client_page(
    keys: &ObjectKeys,
    application: Option<&str>,
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
            application,
            namespace: Some(&keys.namespace),
            name: Some(&keys.name),
            reference: Some(reference.as_str()),
        },
    )
}

/// The binding cookie's value, when it has the shape the operator gives it.
fn binding_cookie(jar: &CookieJar, policy: CookiePolicy) -> Option<String> {
    jar.get(policy.name)
        .map(|c| c.value().to_string())
        .filter(|v| {
            (16..=128).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_gets_hsts_and_a_host_prefixed_secure_cookie() {
        let public: Url = "https://goto-oauth.example.com".parse().unwrap();
        assert_eq!(hsts(&public), Some(HeaderValue::from_static(HSTS)));
        assert_eq!(
            cookie_policy(&public),
            CookiePolicy {
                name: "__Host-goto_oauth_binding",
                secure: true
            }
        );
        let prefixed: Url = "https://example.com/goto-oauth/".parse().unwrap();
        assert_eq!(cookie_policy(&prefixed).name, HOST_BINDING_COOKIE);
    }

    #[test]
    fn loopback_development_gets_neither() {
        let local: Url = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(hsts(&local), None);
        assert_eq!(
            cookie_policy(&local),
            CookiePolicy {
                name: BINDING_COOKIE,
                secure: false
            }
        );
    }
}
