//! One authorization attempt, after its `state` was verified: claim it once across every
//! replica, then either complete it (tokens into the Secret, status written by the
//! controller's own [`desired_status`]) or record why it failed.
//!
//! Conflicts with concurrent writers are retried with `backon`; every write is conditional on
//! the resourceVersion read, so two replicas can never both claim one attempt.

use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tracing::{info, warn};

use crate::{
    Error, Result,
    conditions::{Authorization, ConsentFailure},
    consent::random_token,
    controller::{
        Context, ObjectKeys,
        act::write_secret,
        memory::HeldTokens,
        plan::Plan,
        status::{Events, apply_status, desired_status, publish, write_status},
    },
    goto::{OAuthError, TokenResponse},
    resource::{ConsumedState, GoToOAuthClient},
    secret::StoredTokens,
    validation::ClientSettings,
};

/// Retries after a conflict: short and few, since a human is waiting for the page.
fn on_conflict(times: usize) -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(Duration::from_millis(20))
        .with_max_times(times)
}

/// The outcome of claiming an authorization attempt.
pub(crate) enum Claim {
    /// This replica claimed the nonce; the object as it is after the claim.
    Claimed(Box<GoToOAuthClient>),
    /// The nonce was used before: a replayed callback.
    Replayed,
    /// The resource is gone or was replaced (another uid).
    Gone,
}

/// Records an attempt's nonce as consumed, exactly once across all replicas.
pub(crate) async fn claim(
    ctx: &Context,
    keys: &ObjectKeys,
    nonce: &str,
    expires_at: i64,
) -> Result<Claim> {
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let now = ctx.clock.now().as_second();
    let attempt = || async {
        let Some(obj) = api.get_opt(&keys.name).await? else {
            return Ok(Claim::Gone);
        };
        if obj.metadata.uid.as_deref() != Some(keys.uid.as_str()) {
            return Ok(Claim::Gone);
        }
        let mut status = obj.status.clone().unwrap_or_default();
        if status.consumed_states.iter().any(|c| c.nonce == nonce) {
            return Ok(Claim::Replayed);
        }
        status.consumed_states.retain(|c| c.expires_at > now);
        status.consumed_states.push(ConsumedState {
            nonce: nonce.to_string(),
            expires_at,
        });
        let updated =
            write_status(ctx, keys, obj.metadata.resource_version.clone(), &status).await?;
        Ok(Claim::Claimed(Box::new(updated)))
    };
    attempt.retry(on_conflict(4)).when(Error::is_conflict).await
}

/// What a successful code exchange stored.
pub(crate) struct Completed {
    pub(crate) tokens: StoredTokens,
    pub(crate) secret_name: String,
}

/// Stores a new authorization: the Secret first, then the status (Authorized, a fresh link,
/// expiry, next refresh), so a crash in between loses nothing the leader cannot rebuild.
pub(crate) async fn complete(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    settings: &ClientSettings,
    response: &TokenResponse,
) -> Result<Completed> {
    let now = ctx.clock.now();
    let tokens = StoredTokens::from_response(response, None, settings, now)
        .map_err(|e| Error::OAuth(OAuthError::MalformedResponse(e.to_string())))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let store = || async {
        let current = secrets.get_opt(&settings.secret_name).await?;
        write_secret(ctx, obj, settings, &tokens, current.as_ref()).await
    };
    match store.retry(on_conflict(2)).when(Error::is_conflict).await {
        Ok(_) => {}
        Err(e) if e.is_conflict() => {
            return Err(Error::TokensUnstored(
                "the token Secret kept changing".into(),
            ));
        }
        Err(e) => return Err(e),
    }
    ctx.memory.with(&keys.uid, |m| {
        m.held = Some(HeldTokens {
            tokens: tokens.clone(),
            stored: true,
        });
        m.backoff = Default::default();
    });

    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let write = || async {
        let Some(latest) = api.get_opt(&keys.name).await? else {
            return Ok(false);
        };
        let plan = Plan::after_consent(&latest, settings, tokens.clone(), &keys.uid);
        // The used link is spent; the next re-authorization gets a fresh one.
        let link = plan.link.resolve(|| random_token(32));
        let status = desired_status(
            &latest,
            keys,
            &plan,
            link.as_deref(),
            &ctx.settings.defaults,
            now,
        );
        apply_status(ctx, &latest, keys, status, Events::OnTransition).await
    };
    if let Err(e) = write.retry(on_conflict(4)).when(Error::is_conflict).await {
        // The Secret holds the tokens; the leader's reconcile derives the status from it.
        warn!(error = %e, "authorization stored, status not updated yet");
    }
    info!(namespace = %keys.namespace, name = %keys.name, "authorization stored");
    Ok(Completed {
        tokens,
        secret_name: settings.secret_name.clone(),
    })
}

/// Records a failed attempt: `Authorized` (and `Ready`) carry the failure only while no tokens
/// are stored, so a failed attempt never spoils a working client; an Event always.
pub(crate) async fn record_failure(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    failure: ConsentFailure,
    message: &str,
) -> Result<()> {
    let status = obj.status.clone().unwrap_or_default();
    if status.access_token_expires_at.is_none() {
        let plan = Plan::failed_consent(
            &status,
            Authorization::ConsentFailed {
                failure,
                message: message.to_string(),
            },
        );
        let link = plan.link.resolve(|| random_token(32));
        let desired = desired_status(
            obj,
            keys,
            &plan,
            link.as_deref(),
            &ctx.settings.defaults,
            ctx.clock.now(),
        );
        match apply_status(ctx, obj, keys, desired, Events::Never).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
    }
    publish(ctx, obj, failure.reason(), message).await;
    Ok(())
}
