//! The browser-facing endpoint: `GET /authorize/{namespace}/{name}/{link}` and `GET /callback`.
//!
//! A GoTo admin (usually not a Kubernetes user) opens the shareable link, is sent to GoTo's
//! consent page and comes back to the callback, which exchanges the one-time code and stores the
//! tokens. Every replica serves this; all state travels through the API server (the client's
//! status) and the signed `state`, so a callback works on any replica. Every outcome is a
//! readable page; nothing a browser sends is reflected unescaped, and no token, code or secret
//! ever reaches a page or a log line.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use kube::Api;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::{
    Error,
    cli::is_loopback_host,
    conditions::reason,
    controller::{self, Claim, Context, ObjectKeys},
    oauth::{OAuthError, authorization_request_url},
    pages::{ErrorPage, SuccessPage, error_page, security_headers, success_page},
    resource::GoToOAuthClient,
    secret::rfc3339,
    state::{STATE_TTL_SECONDS, StateClaims, StateError, random_token},
    validation::validate,
};

/// The cookie that binds a `state` to the browser that opened the link.
pub const BINDING_COOKIE: &str = "goto_oauth_binding";
/// Longest request target accepted (codes are long, but not this long).
pub const MAX_URI_LENGTH: usize = 8192;

/// The router for `--listen`.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/authorize/{namespace}/{name}/{link}", get(authorize))
        .route("/callback", get(callback))
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
    } else if request.method() != axum::http::Method::GET
        && request.method() != axum::http::Method::HEAD
    {
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

fn server_error(ns: Option<&str>, name: Option<&str>) -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        &ErrorPage {
            title: "Temporarily unavailable",
            what_happened: "The operator could not reach the Kubernetes API to process this request.",
            what_to_do: "Wait a minute and open the authorization link again.",
            namespace: ns,
            name,
            reference: None,
        },
    )
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == BINDING_COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| {
            (16..=128).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// `GET /authorize/{namespace}/{name}/{link}`: checks the link, binds the browser with a cookie
/// and sends it to GoTo's consent page with a signed, single-use `state`.
async fn authorize(
    State(ctx): State<Arc<Context>>,
    Path((namespace, name, link)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !valid_name(&namespace) || !valid_name(&name) || link.len() > 128 {
        return invalid_link();
    }
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &namespace);
    let obj = match api.get_opt(&name).await {
        Ok(Some(obj)) => obj,
        Ok(None) => return invalid_link(),
        Err(e) => {
            warn!(error = %e, "authorize: reading the client failed");
            return server_error(Some(&namespace), Some(&name));
        }
    };
    // Knowing the namespace and name is not enough: the link token must match, compared in
    // constant time.
    let expected = controller::link_token(obj.status.as_ref()).unwrap_or_default();
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(link.as_bytes())) {
        return invalid_link();
    }
    let Ok(keys) = controller::keys(&obj) else {
        return invalid_link();
    };
    let settings = match validate(&obj, &ctx.settings.defaults) {
        Ok(s) => s,
        Err(_) => {
            return page(
                StatusCode::CONFLICT,
                &ErrorPage {
                    title: "This client is misconfigured",
                    what_happened: "The operator cannot start an authorization for this client because its configuration is invalid.",
                    what_to_do: "Tell the person who sent you the link; they can see the details in the resource's status.",
                    namespace: Some(&namespace),
                    name: Some(&name),
                    reference: Some(reason::INVALID_SPEC),
                },
            );
        }
    };
    match controller::client_credentials(&ctx, &namespace, &settings).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => {
            return page(
                StatusCode::CONFLICT,
                &ErrorPage {
                    title: "This client is not ready yet",
                    what_happened: "The OAuth client secret for this client has not been stored in the cluster.",
                    what_to_do: "Tell the person who sent you the link; once the client secret is in place, open the link again.",
                    namespace: Some(&namespace),
                    name: Some(&name),
                    reference: Some(reason::CLIENT_SECRET_MISSING),
                },
            );
        }
        Err(e) => {
            warn!(error = %e, "authorize: reading the client secret failed");
            return server_error(Some(&namespace), Some(&name));
        }
    }

    let cookie = cookie_value(&headers).unwrap_or_else(|| random_token(32));
    let claims = StateClaims {
        namespace: keys.namespace.clone(),
        name: keys.name.clone(),
        uid: keys.uid.clone(),
        client_id: settings.client_id.clone(),
        nonce: random_token(16),
        expires_at: ctx.clock.now().as_second() + STATE_TTL_SECONDS,
        browser: ctx.state_key.browser_binding(&cookie),
    };
    let state = ctx.state_key.sign(&claims);
    let target = match authorization_request_url(
        settings.authorize_url.as_str(),
        &settings.client_id,
        &settings.redirect_uri,
        &settings.scopes,
        &state,
    ) {
        Ok(url) => url,
        Err(_) => return invalid_link(),
    };
    let secure = !is_loopback_host(&ctx.settings.defaults.public_url);
    let cookie_header = format!(
        "{BINDING_COOKIE}={cookie}; Path=/; Max-Age={STATE_TTL_SECONDS}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    );
    info!(namespace = %keys.namespace, name = %keys.name, "authorization started");
    let mut response = Redirect::to(target.as_str()).into_response();
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(&cookie_header) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /callback?code=…&state=…` (or `?error=…`): verifies the attempt, exchanges the code
/// once, stores the tokens and tells the admin what happened.
async fn callback(State(ctx): State<Arc<Context>>, request: Request<Body>) -> Response {
    let query: HashMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let headers = request.headers().clone();

    let Some(state) = query.get("state").filter(|s| !s.is_empty()) else {
        return state_page(&StateError::Missing);
    };
    // Verify the signature first (ignoring expiry) so an expired attempt can still be reported
    // on the right resource; then apply the expiry.
    let claims = match ctx.state_key.verify(state, i64::MIN) {
        Ok(claims) => claims,
        Err(e) => return state_page(&e),
    };
    let keys = ObjectKeys {
        namespace: claims.namespace.clone(),
        name: claims.name.clone(),
        uid: claims.uid.clone(),
    };
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let obj = match api.get_opt(&keys.name).await {
        Ok(Some(obj)) if obj.metadata.uid.as_deref() == Some(keys.uid.as_str()) => obj,
        Ok(_) => return gone(&keys),
        Err(e) => {
            warn!(error = %e, "callback: reading the client failed");
            return server_error(Some(&keys.namespace), Some(&keys.name));
        }
    };

    let binding_error = if claims.expires_at < ctx.clock.now().as_second() {
        Some(StateError::Expired)
    } else {
        match cookie_value(&headers) {
            None => Some(StateError::CookieMissing),
            Some(cookie) => {
                let expected = ctx.state_key.browser_binding(&cookie);
                if bool::from(expected.as_bytes().ct_eq(claims.browser.as_bytes())) {
                    None
                } else {
                    Some(StateError::BrowserMismatch)
                }
            }
        }
    };
    if let Some(e) = binding_error {
        return record(
            &ctx,
            &obj,
            &keys,
            Failed::new(state_message(&e), state_page_for(&e, &keys)),
        )
        .await;
    }

    // Single use, across every replica.
    let obj = match controller::claim_state(&ctx, &keys, &claims.nonce, claims.expires_at).await {
        Ok(Claim::Claimed(obj)) => *obj,
        Ok(Claim::Replayed) => return state_page_for(&StateError::Replayed, &keys),
        Ok(Claim::Gone) => return gone(&keys),
        Err(e) => {
            warn!(error = %e, "callback: recording the attempt failed");
            return server_error(Some(&keys.namespace), Some(&keys.name));
        }
    };
    match complete_attempt(&ctx, &obj, &keys, &claims, &query).await {
        Ok(response) => response,
        Err(failed) => record(&ctx, &obj, &keys, failed).await,
    }
}

/// A failed authorization attempt: what goes on the resource and the page the admin sees.
struct Failed {
    reason: &'static str,
    message: String,
    response: Response,
}

impl Failed {
    fn new(message: impl Into<String>, response: Response) -> Failed {
        Failed {
            reason: reason::AUTHORIZATION_FAILED,
            message: message.into(),
            response,
        }
    }
}

/// Records a failed attempt on the resource (condition and Event), then answers with its page.
async fn record(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    failed: Failed,
) -> Response {
    if let Err(e) =
        controller::record_consent_failure(ctx, obj, keys, failed.reason, &failed.message).await
    {
        warn!(error = %e, "callback: recording the failed attempt failed");
    }
    failed.response
}

/// An error page about one client.
fn client_page(
    keys: &ObjectKeys,
    status: StatusCode,
    title: &str,
    what_happened: &str,
    what_to_do: &str,
    reference: &str,
) -> Response {
    page(
        status,
        &ErrorPage {
            title,
            what_happened,
            what_to_do,
            namespace: Some(&keys.namespace),
            name: Some(&keys.name),
            reference: Some(reference),
        },
    )
}

/// The part of the callback after the attempt was verified and claimed: GoTo's answer, the
/// code exchange and storing the tokens.
async fn complete_attempt(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    claims: &StateClaims,
    query: &HashMap<String, String>,
) -> Result<Response, Failed> {
    if let Some(error) = query.get("error") {
        let description = query.get("error_description").map(|d| {
            d.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        });
        let error_code: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        info!(namespace = %keys.namespace, name = %keys.name, error = %error_code, "consent not given");
        if error_code == "access_denied" {
            let message = "Deny was clicked on GoTo's consent page";
            return Err(Failed {
                reason: reason::ACCESS_DENIED,
                message: message.into(),
                response: client_page(
                    keys,
                    StatusCode::FORBIDDEN,
                    "Authorization was denied",
                    message,
                    "Nothing was stored. If this was a mistake, open the authorization link again and click Allow.",
                    reason::ACCESS_DENIED,
                ),
            });
        }
        let message = match &description {
            Some(d) => format!("GoTo returned error {error_code}: {d}"),
            None => format!("GoTo returned error {error_code}"),
        };
        let response = client_page(
            keys,
            StatusCode::BAD_GATEWAY,
            "GoTo reported an error",
            &message,
            "Nothing was stored. Open the authorization link again; if it keeps failing, tell the person who sent it.",
            reason::AUTHORIZATION_FAILED,
        );
        return Err(Failed::new(message, response));
    }

    let Some(code) = query.get("code").filter(|c| !c.is_empty()) else {
        let message = "GoTo sent the browser back without an authorization code";
        let response = client_page(
            keys,
            StatusCode::BAD_REQUEST,
            "No authorization code",
            message,
            "Open the authorization link again and click Allow.",
            reason::AUTHORIZATION_FAILED,
        );
        return Err(Failed::new(message, response));
    };

    let settings = validate(obj, &ctx.settings.defaults).map_err(|message| {
        Failed::new(
            format!("the client's spec became invalid during the authorization: {message}"),
            client_page(
                keys,
                StatusCode::CONFLICT,
                "This client is misconfigured",
                "The client's configuration became invalid while you were authorizing. Nothing was stored.",
                "Tell the person who sent you the link; once it is fixed, open the link again.",
                reason::INVALID_SPEC,
            ),
        )
    })?;
    if claims.client_id != settings.client_id {
        return Err(Failed::new(
            "the client id changed while the authorization was in progress",
            client_page(
                keys,
                StatusCode::CONFLICT,
                "The client changed",
                "The OAuth client was reconfigured while you were authorizing. Nothing was stored.",
                "Open the authorization link again.",
                reason::AUTHORIZATION_FAILED,
            ),
        ));
    }
    let credentials = match controller::client_credentials(ctx, &keys.namespace, &settings).await {
        Ok(Ok(c)) => c,
        Ok(Err(message)) => {
            return Err(Failed::new(
                format!("the code could not be exchanged: {message}"),
                client_page(
                    keys,
                    StatusCode::CONFLICT,
                    "This client is not ready",
                    "The OAuth client secret is missing from the cluster, so the authorization could not be completed. Nothing was stored.",
                    "Tell the person who sent you the link; once the client secret is in place, open the link again.",
                    reason::CLIENT_SECRET_MISSING,
                ),
            ));
        }
        Err(e) => {
            warn!(error = %e, "callback: reading the client secret failed");
            return Ok(server_error(Some(&keys.namespace), Some(&keys.name)));
        }
    };

    ctx.limiter.acquire().await;
    let started = std::time::Instant::now();
    let response = ctx
        .token_client
        .exchange_code(
            settings.token_url.as_str(),
            &credentials,
            code,
            &settings.redirect_uri,
        )
        .await;
    controller::observe_token_request(ctx, "authorization_code", &response, started);
    let response = response.map_err(|e| {
        warn!(namespace = %keys.namespace, name = %keys.name, error = %e, "code exchange failed");
        Failed::new(
            format!("exchanging the authorization code failed: {e}"),
            exchange_error_page(&e, keys),
        )
    })?;

    match controller::complete_authorization(ctx, obj, keys, &settings, &response).await {
        Ok(done) => {
            let expires = rfc3339(done.tokens.expires_at);
            Ok(html(
                StatusCode::OK,
                success_page(&SuccessPage {
                    namespace: &keys.namespace,
                    name: &keys.name,
                    client_id: &settings.client_id,
                    account: done.tokens.principal.as_deref(),
                    access_token_expires_at: Some(&expires),
                    secret_name: &done.secret_name,
                }),
            ))
        }
        Err(Error::SecretConflict(message)) => Err(Failed::new(
            format!("the tokens could not be stored: {message}"),
            client_page(
                keys,
                StatusCode::CONFLICT,
                "The tokens could not be stored",
                "A Secret with the target name already exists and belongs to something else, so the operator will not overwrite it. GoTo's consent was given but nothing was stored.",
                "Tell the person who sent you the link; after they resolve the Secret conflict, open the link again.",
                reason::SECRET_CONFLICT,
            ),
        )),
        Err(Error::OAuth(e)) => Err(Failed::new(
            format!("GoTo's token response was unusable: {e}"),
            exchange_error_page(&e, keys),
        )),
        Err(e) => {
            warn!(error = %e, "callback: storing the tokens failed");
            Ok(server_error(Some(&keys.namespace), Some(&keys.name)))
        }
    }
}

fn gone(keys: &ObjectKeys) -> Response {
    page(
        StatusCode::GONE,
        &ErrorPage {
            title: "This client no longer exists",
            what_happened: "The OAuth client this authorization was for was deleted or replaced while you were authorizing. Nothing was stored.",
            what_to_do: "Ask the person who sent you the link for a new one.",
            namespace: Some(&keys.namespace),
            name: Some(&keys.name),
            reference: None,
        },
    )
}

fn state_message(e: &StateError) -> String {
    match e {
        StateError::Expired => "the authorization took longer than 10 minutes and expired".into(),
        StateError::CookieMissing => "the callback arrived in a browser that did not open the authorization link".into(),
        StateError::BrowserMismatch => "the callback arrived in a different browser from the one that opened the authorization link".into(),
        StateError::Replayed => "this authorization attempt was already used".into(),
        other => format!("the authorization response was not valid ({})", other.reason()),
    }
}

fn state_page(e: &StateError) -> Response {
    state_page_inner(e, None)
}

fn state_page_for(e: &StateError, keys: &ObjectKeys) -> Response {
    state_page_inner(e, Some(keys))
}

fn state_page_inner(e: &StateError, keys: Option<&ObjectKeys>) -> Response {
    let (status, title, what_to_do) = match e {
        StateError::Expired => (
            StatusCode::BAD_REQUEST,
            "This authorization expired",
            "Authorizations must be completed within 10 minutes. Open the authorization link again.",
        ),
        StateError::Replayed => (
            StatusCode::CONFLICT,
            "This authorization was already used",
            "Each authorization can be completed once. If you still need to authorize, open the authorization link again.",
        ),
        StateError::CookieMissing | StateError::BrowserMismatch => (
            StatusCode::BAD_REQUEST,
            "Please use the same browser",
            "Open the authorization link again and finish the sign-in in the same browser window.",
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            "This is not a valid authorization response",
            "Open the authorization link you were sent again. Do not edit or reuse the address GoTo sends you back to.",
        ),
    };
    let message = state_message(e);
    page(
        status,
        &ErrorPage {
            title,
            what_happened: &format!("Nothing was stored: {message}."),
            what_to_do,
            namespace: keys.map(|k| k.namespace.as_str()),
            name: keys.map(|k| k.name.as_str()),
            reference: Some(e.reason()),
        },
    )
}

fn exchange_error_page(e: &OAuthError, keys: &ObjectKeys) -> Response {
    let (status, title, what_to_do) = match e {
        OAuthError::InvalidGrant { .. } => (
            StatusCode::BAD_REQUEST,
            "GoTo rejected the authorization code",
            "The code was already used or expired. Open the authorization link again.",
        ),
        OAuthError::InvalidClient { .. } => (
            StatusCode::BAD_GATEWAY,
            "GoTo rejected the client credentials",
            "Tell the person who sent you the link: the client id or client secret stored in the cluster is wrong.",
        ),
        OAuthError::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "GoTo did not answer in time",
            "Open the authorization link again in a few minutes.",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "GoTo's token service failed",
            "Open the authorization link again in a few minutes; if it keeps failing, tell the person who sent it.",
        ),
    };
    client_page(
        keys,
        status,
        title,
        &format!("Nothing was stored. Details: {e}"),
        what_to_do,
        reason::AUTHORIZATION_FAILED,
    )
}
