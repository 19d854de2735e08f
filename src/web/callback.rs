//! `GET /callback?code=…&state=…` (or `?error=…`): verifies the attempt, claims it once,
//! exchanges the code, stores the tokens and tells the admin what happened.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::State,
    http::{StatusCode, Uri},
    response::Response,
};
use axum_extra::extract::CookieJar;
use kube::Api;
use tracing::{info, warn};

use super::{binding_cookie, client_page, cookie_policy, html, page, server_error};
use crate::{
    Error,
    conditions::{ConsentFailure, Reason},
    consent::{
        StateClaims, StateError,
        attempt::{self, Claim},
        link_token,
    },
    controller::{Context, ObjectKeys, observe::read_credentials, status::EventAction},
    goto::OAuthError,
    resource::GoToOAuthClient,
    secret::rfc3339,
    validation::validate,
    web::pages::{ErrorPage, SuccessPage, success_page},
};

/// `GET /callback?code=…&state=…` (or `?error=…`): verifies the attempt, exchanges the code
/// once, stores the tokens and tells the admin what happened.
pub(super) async fn callback(
    State(ctx): State<Arc<Context>>,
    jar: CookieJar,
    uri: Uri,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();

    let Some(state) = query.get("state").filter(|s| !s.is_empty()) else {
        return state_page(&StateError::Missing);
    };
    // Everything that can be checked without the API server comes first, and a failure there
    // writes nothing: an unauthenticated request must not cause API work or Events. The
    // signature is checked before the expiry so an expired attempt can name its resource.
    let claims = match ctx.state_key.verify(state, i64::MIN) {
        Ok(claims) => claims,
        Err(e) => return state_page(&e),
    };
    let keys = ObjectKeys {
        namespace: claims.namespace.clone(),
        name: claims.name.clone(),
        uid: claims.uid.clone(),
    };
    if !ctx.watches_namespace(&keys.namespace) {
        return state_page(&StateError::Forged);
    }
    if claims.expires_at <= ctx.clock.now().as_second() {
        return state_page_for(&StateError::Expired, &keys);
    }
    let cookie = binding_cookie(&jar, cookie_policy(&ctx.settings.defaults.public_url));
    if let Err(e) = ctx.state_key.verify_browser(&claims, cookie.as_deref()) {
        return state_page_for(&e, &keys);
    }

    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let obj = match api.get_opt(&keys.name).await {
        Ok(Some(obj)) if obj.metadata.uid.as_deref() == Some(keys.uid.as_str()) => obj,
        Ok(_) => return gone(&keys),
        Err(e) => {
            warn!(error = %e, "callback: reading the client failed");
            return server_error(Some(&keys));
        }
    };
    // A link that was rotated or spent since this attempt started takes its attempts along.
    let current_link = link_token(obj.status.as_ref());
    if let Err(e) = ctx.state_key.verify_link(&claims, current_link.as_deref()) {
        return state_page_for(&e, &keys);
    }

    // Single use, across every replica.
    let obj = match attempt::claim(&ctx, &keys, obj, &claims.nonce, claims.expires_at).await {
        Ok(Claim::Claimed(obj)) => *obj,
        Ok(Claim::Replayed) => return state_page_for(&StateError::Replayed, &keys),
        Ok(Claim::Gone) => return gone(&keys),
        Ok(Claim::TooMany) => return too_many_attempts(&keys),
        Err(e) => {
            warn!(error = %e, "callback: recording the attempt failed");
            return server_error(Some(&keys));
        }
    };
    // Claimed: from here the attempt runs to its end on its own task, even when the browser
    // goes away or the request times out. GoTo spends the code in the exchange, and the tokens
    // it answers with exist nowhere else until they are in the Secret.
    let task = tokio::spawn(async move {
        match complete_attempt(&ctx, &obj, &keys, &claims, &query).await {
            Ok(response) => response,
            Err(failed) => record(&ctx, &obj, &keys, failed).await,
        }
    });
    match task.await {
        Ok(response) => response,
        Err(e) => {
            warn!(error = %e, "callback: completing the attempt failed");
            server_error(None)
        }
    }
}

fn too_many_attempts(keys: &ObjectKeys) -> Response {
    client_page(
        keys,
        None,
        StatusCode::TOO_MANY_REQUESTS,
        "Too many authorization attempts",
        "This application had too many authorization attempts in the last few minutes. Nothing was stored.",
        "Wait ten minutes, then open the authorization link again.",
        Reason::AuthorizationFailed,
    )
}

/// A failed authorization attempt: what goes on the resource and the page the admin sees.
struct Failed {
    failure: ConsentFailure,
    /// Where it failed: at GoTo's consent page, or exchanging the code (distinct Events).
    action: EventAction,
    message: String,
    response: Response,
}

impl Failed {
    fn new(action: EventAction, message: impl Into<String>, response: Response) -> Failed {
        Failed {
            failure: ConsentFailure::AuthorizationFailed,
            action,
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
    if let Err(e) = attempt::record_failure(
        ctx,
        obj,
        keys,
        failed.failure,
        failed.action,
        &failed.message,
    )
    .await
    {
        warn!(error = %e, "callback: recording the failed attempt failed");
    }
    failed.response
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
    let application = obj.display_name();
    let app = Some(application.as_str());
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
                failure: ConsentFailure::AccessDenied,
                action: EventAction::Consent,
                message: message.into(),
                response: client_page(
                    keys,
                    app,
                    StatusCode::FORBIDDEN,
                    "Authorization was denied",
                    message,
                    "Nothing was stored. If this was a mistake, open the authorization link again and click Allow.",
                    Reason::AccessDenied,
                ),
            });
        }
        // The status and the Event carry only the sanitized error code; GoTo's description
        // (whatever the browser sent) is shown on this page only, escaped.
        let message = format!("GoTo returned error {error_code}");
        let shown = match &description {
            Some(d) => format!("{message}: {d}"),
            None => message.clone(),
        };
        let response = client_page(
            keys,
            app,
            StatusCode::BAD_GATEWAY,
            "GoTo reported an error",
            &shown,
            "Nothing was stored. Open the authorization link again; if it keeps failing, tell the person who sent it.",
            Reason::AuthorizationFailed,
        );
        return Err(Failed::new(EventAction::Consent, message, response));
    }

    let Some(code) = query.get("code").filter(|c| !c.is_empty()) else {
        let message = "GoTo sent the browser back without an authorization code";
        let response = client_page(
            keys,
            app,
            StatusCode::BAD_REQUEST,
            "No authorization code",
            message,
            "Open the authorization link again and click Allow.",
            Reason::AuthorizationFailed,
        );
        return Err(Failed::new(EventAction::Consent, message, response));
    };

    let settings = validate(obj, &ctx.settings.defaults).map_err(|message| {
        Failed::new(
            EventAction::ExchangeCode,
            format!("the client's spec became invalid during the authorization: {message}"),
            client_page(
                keys,
                app,
                StatusCode::CONFLICT,
                "This application is misconfigured",
                "The application's GoTo settings became incomplete or wrong while you were authorizing. Nothing was stored.",
                "Tell the person who sent you the link; once it is fixed, open the link again.",
                Reason::InvalidSpec,
            ),
        )
    })?;
    if claims.client_id != settings.client_id {
        return Err(Failed::new(
            EventAction::ExchangeCode,
            "the client id changed while the authorization was in progress",
            client_page(
                keys,
                app,
                StatusCode::CONFLICT,
                "The application changed",
                "The application was reconfigured while you were authorizing. Nothing was stored.",
                "Open the authorization link again.",
                Reason::AuthorizationFailed,
            ),
        ));
    }
    let credentials = match read_credentials(ctx, keys, &settings).await {
        Ok(Ok(c)) => c,
        Ok(Err(problem)) => {
            return Err(Failed::new(
                EventAction::ExchangeCode,
                format!("the code could not be exchanged: {problem}"),
                client_page(
                    keys,
                    app,
                    StatusCode::CONFLICT,
                    "This application is not ready",
                    "The application's GoTo client secret is missing, so the authorization could not be completed. Nothing was stored.",
                    "Tell the person who sent you the link; once the client secret is in place, open the link again.",
                    Reason::ClientSecretMissing,
                ),
            ));
        }
        Err(e) => {
            warn!(error = %e, "callback: reading the client secret failed");
            return Ok(server_error(Some(keys)));
        }
    };

    let permit = ctx.goto.permit().await;
    let response = ctx
        .goto
        .exchange_code(
            permit,
            settings.token_url.as_str(),
            &credentials,
            code,
            &settings.redirect_uri,
        )
        .await;
    let response = response.map_err(|e| {
        warn!(namespace = %keys.namespace, name = %keys.name, error = %e, "code exchange failed");
        Failed::new(
            EventAction::ExchangeCode,
            format!("exchanging the authorization code failed: {e}"),
            exchange_error_page(&e, keys, app),
        )
    })?;

    if let Some(expected) = obj
        .spec
        .expected_account
        .as_deref()
        .filter(|e| !e.trim().is_empty())
    {
        let principal = response.principal.as_deref().or(response.email.as_deref());
        if !attempt::is_expected_account(expected, principal, response.account_key.as_deref()) {
            let message = format!(
                "the consent was given by {}, not by the account spec.expectedAccount names; its tokens were not stored",
                attempt::describe_account(&response)
            );
            return Err(Failed {
                failure: ConsentFailure::UnexpectedAccount,
                action: EventAction::Consent,
                response: client_page(
                    keys,
                    app,
                    StatusCode::FORBIDDEN,
                    "This GoTo account cannot authorize this application",
                    &format!(
                        "You signed in to GoTo as {}, but this application accepts only another GoTo account. Nothing was stored.",
                        attempt::describe_account(&response)
                    ),
                    "Sign in to GoTo with the account this application expects (ask the person who sent you the link which one), then open the link again.",
                    Reason::UnexpectedAccount,
                ),
                message,
            });
        }
    }

    match attempt::complete(ctx, obj, keys, &settings, &response).await {
        Ok(done) => {
            let expires = rfc3339(done.tokens.expires_at);
            Ok(html(
                StatusCode::OK,
                success_page(&SuccessPage {
                    application: &application,
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
            EventAction::ExchangeCode,
            format!("the tokens could not be stored: {message}"),
            client_page(
                keys,
                app,
                StatusCode::CONFLICT,
                "The access could not be saved",
                "You clicked Allow at GoTo, but the place where this application keeps its GoTo access is already used by something else, so nothing was stored.",
                "Tell the person who sent you the link; once they have resolved it, open the link again.",
                Reason::SecretConflict,
            ),
        )),
        Err(Error::OAuth(e)) => Err(Failed::new(
            EventAction::ExchangeCode,
            format!("GoTo's token response was unusable: {e}"),
            exchange_error_page(&e, keys, app),
        )),
        Err(e) => {
            warn!(error = %e, "callback: storing the tokens failed");
            Ok(server_error(Some(keys)))
        }
    }
}

fn gone(keys: &ObjectKeys) -> Response {
    page(
        StatusCode::GONE,
        &ErrorPage {
            title: "This application no longer exists here",
            what_happened: "The application this authorization was for was removed or replaced while you were authorizing. Nothing was stored.",
            what_to_do: "Ask the person who sent you the link for a new one.",
            application: None,
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
        StateError::LinkReplaced => "the authorization link it started from was replaced by a newer one, or already used".into(),
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
        StateError::LinkReplaced => (
            StatusCode::CONFLICT,
            "This authorization link is no longer valid",
            "Ask the person who sent you the link for the current one.",
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
            application: None,
            namespace: keys.map(|k| k.namespace.as_str()),
            name: keys.map(|k| k.name.as_str()),
            reference: Some(e.reason()),
        },
    )
}

fn exchange_error_page(e: &OAuthError, keys: &ObjectKeys, app: Option<&str>) -> Response {
    let (status, title, what_to_do) = match e {
        OAuthError::InvalidGrant { .. } => (
            StatusCode::BAD_REQUEST,
            "GoTo rejected the authorization code",
            "The code was already used or expired. Open the authorization link again.",
        ),
        OAuthError::InvalidClient { .. } => (
            StatusCode::BAD_GATEWAY,
            "GoTo rejected the client credentials",
            "Tell the person who sent you the link: the application's GoTo client ID or client secret is wrong.",
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
        app,
        status,
        title,
        &format!("Nothing was stored. Details: {e}"),
        what_to_do,
        Reason::AuthorizationFailed,
    )
}
