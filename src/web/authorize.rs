//! `GET /authorize/{namespace}/{name}/{link}`: checks the link, binds the browser with a cookie
//! and sends it to GoTo's consent page with a signed, single-use `state`.

use std::sync::Arc;

use axum::{
    extract::{Path, State, rejection::PathRejection},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use axum_extra::extract::{
    CookieJar,
    cookie::{Cookie, SameSite},
};
use tracing::info;

use super::{binding_cookie, client_page, cookie_policy, invalid_link};
use crate::{
    conditions::Reason,
    consent::{StateClaims, index::Refusal, random_token, state::STATE_TTL_SECONDS},
    controller::{Context, ObjectKeys},
    goto::protocol::authorization_request_url,
    validation::{check_dns_subdomain, is_dns_label},
};

pub(super) async fn authorize(
    State(ctx): State<Arc<Context>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    jar: CookieJar,
) -> Response {
    // A segment that does not decode (`%80`) is a wrong link like any other: axum's own
    // rejection would be a plain-text 400 that is not one of our pages.
    let Ok(Path((namespace, name, link))) = path else {
        return invalid_link();
    };
    if !is_dns_label(&namespace) || check_dns_subdomain(&name).is_err() || link.len() > 128 {
        return invalid_link();
    }
    // Knowing the namespace and name is not enough: the link token must match. A wrong link
    // is refused from memory (no API request) at a fixed deadline, and a right one is started
    // from memory too: the index holds what the redirect needs. The callback reads the client
    // before anything is written.
    let Some(start) = ctx.links.resolve(&namespace, &name, &link).await else {
        return invalid_link();
    };
    let keys = ObjectKeys {
        namespace,
        name,
        uid: start.uid.into(),
    };
    let application = start.display_name;
    let not_ready = |title, what_happened, what_to_do, reason| {
        client_page(
            &keys,
            Some(&application),
            StatusCode::CONFLICT,
            title,
            what_happened,
            what_to_do,
            reason,
        )
    };
    let request = match start.request {
        Ok(request) => request,
        Err(Refusal::InvalidSpec) => {
            return not_ready(
                "This application is misconfigured",
                "The authorization cannot start because this application's GoTo settings are incomplete or wrong.",
                "Tell the person who sent you the link; they can see what to fix on their side.",
                Reason::InvalidSpec,
            );
        }
        Err(Refusal::ClientSecretMissing) => {
            return not_ready(
                "This application is not ready yet",
                "The application's GoTo client secret has not been set up yet.",
                "Tell the person who sent you the link; once the client secret is in place, open the link again.",
                Reason::ClientSecretMissing,
            );
        }
    };

    let policy = cookie_policy(&ctx.settings.defaults.public_url);
    let cookie = binding_cookie(&jar, policy).unwrap_or_else(|| random_token(32));
    let claims = StateClaims {
        namespace: keys.namespace.clone(),
        name: keys.name.clone(),
        uid: keys.uid.clone(),
        client_id: request.client_id.to_string(),
        nonce: random_token(16),
        expires_at: ctx.clock.now().as_second() + STATE_TTL_SECONDS,
        browser: ctx.state_key.browser_binding(&cookie),
        link: ctx.state_key.link_binding(&link),
    };
    let state = ctx.state_key.sign(&claims);
    let Ok(target) = authorization_request_url(
        &request.authorize_url,
        &request.client_id,
        &request.redirect_uri,
        &request.scopes,
        &state,
    ) else {
        return invalid_link();
    };
    let binding = Cookie::build((policy.name, cookie))
        .path("/")
        .max_age(cookie::time::Duration::seconds(STATE_TTL_SECONDS))
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(policy.secure);
    info!(namespace = %keys.namespace, name = %keys.name, "authorization started");
    let mut response = (jar.add(binding), Redirect::to(target.as_str())).into_response();
    *response.status_mut() = StatusCode::FOUND;
    response
}
