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
use kube::Api;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use super::{binding_cookie, client_page, cookie_policy, invalid_link, server_error};
use crate::{
    conditions::Reason,
    consent::{StateClaims, link_token, random_token, state::STATE_TTL_SECONDS},
    controller::{Context, ObjectKeys, observe::read_credentials},
    goto::protocol::authorization_request_url,
    resource::GoToOAuthClient,
    validation::{check_dns_subdomain, is_dns_label, validate},
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
    // is refused from memory (no API request) at a fixed deadline; only the holder of a
    // published link makes the operator read the client.
    let Some(uid) = ctx.links.resolve(&namespace, &name, &link).await else {
        return invalid_link();
    };
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &namespace);
    let obj = match api.get_opt(&name).await {
        Ok(Some(obj)) if obj.metadata.uid.as_deref() == Some(uid.as_str()) => obj,
        Ok(_) => return invalid_link(),
        Err(e) => {
            warn!(error = %e, "authorize: reading the client failed");
            return server_error(None);
        }
    };
    // The index follows a watch; the object just read is the word on the current link.
    let expected = link_token(obj.status.as_ref()).unwrap_or_default();
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(link.as_bytes())) {
        return invalid_link();
    }
    let Ok(keys) = ObjectKeys::of(&obj) else {
        return invalid_link();
    };
    let application = obj.display_name();
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
    let Ok(settings) = validate(&obj, &ctx.settings.defaults) else {
        return not_ready(
            "This application is misconfigured",
            "The authorization cannot start because this application's GoTo settings are incomplete or wrong.",
            "Tell the person who sent you the link; they can see what to fix on their side.",
            Reason::InvalidSpec,
        );
    };
    match read_credentials(&ctx, &keys.namespace, &settings).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => {
            return not_ready(
                "This application is not ready yet",
                "The application's GoTo client secret has not been set up yet.",
                "Tell the person who sent you the link; once the client secret is in place, open the link again.",
                Reason::ClientSecretMissing,
            );
        }
        Err(e) => {
            warn!(error = %e, "authorize: reading the client secret failed");
            return server_error(Some(&keys));
        }
    }

    let policy = cookie_policy(&ctx.settings.defaults.public_url);
    let cookie = binding_cookie(&jar, policy).unwrap_or_else(|| random_token(32));
    let claims = StateClaims {
        namespace: keys.namespace.clone(),
        name: keys.name.clone(),
        uid: keys.uid.clone(),
        client_id: settings.client_id.clone(),
        nonce: random_token(16),
        expires_at: ctx.clock.now().as_second() + STATE_TTL_SECONDS,
        browser: ctx.state_key.browser_binding(&cookie),
        link: ctx.state_key.link_binding(&expected),
    };
    let state = ctx.state_key.sign(&claims);
    let Ok(target) = authorization_request_url(
        settings.authorize_url.as_str(),
        &settings.client_id,
        &settings.redirect_uri,
        &settings.scopes,
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
