//! Act: carry out a [`Plan`]: write the token Secret, delete the previous one after a rename,
//! and send the refresh. Every write is conditional on what was read, by server-side apply
//! under the operator's one field manager; a refreshed token is held in memory before it is
//! written, so a failed write never loses a rotated refresh token.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use secrecy::ExposeSecret;
use tracing::{debug, info, warn};

use super::{
    Context,
    memory::HeldTokens,
    observe::Observed,
    plan::{Plan, RefreshOutcome, SecretWrite},
    schedule,
};
use crate::{
    Error, Result,
    goto::{ClientCredentials, OAuthError},
    metrics::RefreshResult,
    resource::{GoToOAuthClient, MANAGER},
    secret::{StoredTokens, desired_secret, is_owned_by},
    validation::ClientSettings,
};

/// How long a refreshed token's Secret write is retried inside the refresh itself. GoTo may
/// have invalidated the old refresh token already, so the new one must reach the Secret before
/// this replica can stop (shutdown, lost leadership); past this, the reconcile retries keep it.
const STORE_RETRY_WINDOW: Duration = Duration::from_secs(10);

/// Performs the plan's writes and refresh; returns what the refresh did, if one was planned.
pub(crate) async fn act(
    ctx: &Context,
    o: &Observed,
    plan: &Plan,
) -> Result<Option<RefreshOutcome>> {
    let Ok(settings) = &o.settings else {
        return Ok(None);
    };
    let Some(current) = &plan.tokens else {
        return Ok(None);
    };
    match &plan.write {
        Some(write) => {
            if let Err(e) = write_secret(ctx, &o.obj, settings, current, o.target.as_ref()).await {
                return Err(Error::TokensUnstored(e.to_string()));
            }
            remember_stored(ctx, &o.keys.uid, current);
            if let SecretWrite::Move { from } = write {
                delete_owned_secret(ctx, &o.obj, &o.keys.namespace, from).await?;
            }
            info!(?write, "token Secret written");
        }
        None if !o.conflict => remember_stored(ctx, &o.keys.uid, current),
        None => {}
    }
    let (Some(_), Some(Ok(credentials))) = (plan.refresh, &o.credentials) else {
        return Ok(None);
    };
    refresh(
        ctx,
        o,
        settings,
        credentials,
        current,
        plan.refresh_request.clone(),
    )
    .await
    .map(Some)
}

fn remember_stored(ctx: &Context, uid: &str, tokens: &StoredTokens) {
    ctx.memory.with(uid, |m| {
        m.held = Some(HeldTokens {
            tokens: tokens.clone(),
            stored: true,
        });
    });
}

/// Writes the token Secret. An existing Secret is updated only at the resourceVersion that was
/// read (and only when this resource owns it); an absent one is created without force, so a
/// Secret someone else created meanwhile is reported as a conflict, never taken over.
pub(crate) async fn write_secret(
    ctx: &Context,
    obj: &GoToOAuthClient,
    settings: &ClientSettings,
    tokens: &StoredTokens,
    current: Option<&Secret>,
) -> Result<Secret> {
    let namespace = obj
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut desired = desired_secret(obj, settings, tokens);
    let params = match current {
        Some(existing) => {
            if !is_owned_by(existing, obj) {
                return Err(Error::SecretConflict(format!(
                    "Secret {namespace}/{} exists and is not owned by this GoToOAuthClient",
                    settings.secret_name
                )));
            }
            desired.metadata.resource_version = existing.resource_version();
            PatchParams::apply(MANAGER).force()
        }
        None => PatchParams::apply(MANAGER),
    };
    let mut value = serde_json::to_value(&desired)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    match api
        .patch(&settings.secret_name, &params, &Patch::Apply(value))
        .await
    {
        Ok(secret) => Ok(secret),
        Err(kube::Error::Api(status)) if status.code == 409 && current.is_none() => {
            Err(Error::SecretConflict(format!(
                "Secret {namespace}/{} was created by someone else",
                settings.secret_name
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Deletes the token Secret under its old name after a rename, if it is still this client's.
async fn delete_owned_secret(
    ctx: &Context,
    obj: &GoToOAuthClient,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = api.get_opt(name).await?.filter(|s| is_owned_by(s, obj)) else {
        return Ok(());
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.metadata.uid.clone(),
            resource_version: secret.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => info!(
            secret = name,
            "removed the previous token Secret after secretName changed"
        ),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// One refresh: bounded in concurrency, rate-limited, sent only while this replica leads, and
/// storing a rotated refresh token before anything else can happen to it.
async fn refresh(
    ctx: &Context,
    o: &Observed,
    settings: &ClientSettings,
    credentials: &ClientCredentials,
    current: &StoredTokens,
    refresh_request: Option<String>,
) -> Result<RefreshOutcome> {
    let keys = &o.keys;
    let _slot = ctx
        .refresh_slots
        .acquire()
        .await
        .map_err(|_| Error::TokensUnstored("shutting down".into()))?;
    let permit = ctx.goto.permit().await;
    if !ctx.leadership.confirm().await? {
        warn!("not holding the leader Lease; refresh not sent");
        return Ok(RefreshOutcome::NotLeader);
    }
    let response = ctx
        .goto
        .refresh(
            permit,
            settings.token_url.as_str(),
            credentials,
            current.refresh_token.expose_secret(),
        )
        .await;
    let now = ctx.clock.now();
    let count = |result| {
        ctx.metrics
            .count_refresh(&keys.namespace, &keys.name, result)
    };
    match response {
        Ok(response) => {
            let new = StoredTokens::from_response(&response, Some(current), settings, now)
                .map_err(|e| Error::TokensUnstored(e.to_string()))?;
            // Held in memory first: if the write fails, the next reconcile writes it again and
            // sends no second refresh.
            ctx.memory.with(&keys.uid, |m| {
                m.held = Some(HeldTokens {
                    tokens: new.clone(),
                    stored: false,
                });
                m.answered_refresh_request = refresh_request;
                m.backoff.refresh_failures = 0;
                m.backoff.not_before = None;
                m.backoff.last_failure = None;
            });
            count(RefreshResult::Success);
            match store_refreshed(ctx, &o.obj, settings, &new, o.target.as_ref()).await {
                Ok(()) => {
                    ctx.memory.with(&keys.uid, |m| {
                        if let Some(held) = &mut m.held {
                            held.stored = true;
                        }
                    });
                    info!(expires_at = %new.expires_at, "access token refreshed");
                    Ok(RefreshOutcome::Refreshed(Box::new(new)))
                }
                Err(e) => {
                    warn!(error = %e, "refreshed tokens not stored yet; retrying the write");
                    Err(Error::TokensUnstored(e.to_string()))
                }
            }
        }
        Err(e) if e.needs_reauthorization() => {
            count(match e {
                OAuthError::InvalidClient { .. } => RefreshResult::InvalidClient,
                _ => RefreshResult::InvalidGrant,
            });
            ctx.memory.with(&keys.uid, |m| {
                m.answered_refresh_request = refresh_request;
                m.backoff.refresh_failures = 0;
                m.backoff.not_before = None;
                m.backoff.last_failure = None;
            });
            warn!(error = %e, "refresh token rejected; a new authorization is required");
            Ok(RefreshOutcome::Rejected {
                error: e.to_string(),
            })
        }
        Err(e) => {
            let retry_after = match &e {
                OAuthError::RateLimited { retry_after } => *retry_after,
                _ => None,
            };
            count(if matches!(e, OAuthError::RateLimited { .. }) {
                RefreshResult::RateLimited
            } else {
                RefreshResult::TransientError
            });
            let (attempt, retry_at) = ctx.memory.with(&keys.uid, |m| {
                m.backoff.refresh_failures += 1;
                let delay = schedule::backoff(
                    m.backoff.refresh_failures,
                    retry_after,
                    current.expires_at.duration_since(now),
                );
                let at: Timestamp = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
                m.backoff.not_before = Some(at);
                m.backoff.last_failure = Some(e.to_string());
                (m.backoff.refresh_failures, at)
            });
            warn!(error = %e, attempt, retry_at = %retry_at, "refresh failed; will retry");
            Ok(RefreshOutcome::Failed {
                message: e.to_string(),
                retry_at,
            })
        }
    }
}

/// Writes refreshed tokens, retrying transient failures for up to [`STORE_RETRY_WINDOW`] and
/// re-reading the Secret before each retry (a conflict means it changed meanwhile).
async fn store_refreshed(
    ctx: &Context,
    obj: &GoToOAuthClient,
    settings: &ClientSettings,
    tokens: &StoredTokens,
    target: Option<&Secret>,
) -> Result<()> {
    let namespace = obj
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let first = std::sync::atomic::AtomicBool::new(true);
    let attempt = || async {
        let current = if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
            target.cloned()
        } else {
            let latest = api.get_opt(&settings.secret_name).await?;
            if let Some(stored) = latest.as_ref().and_then(StoredTokens::from_secret)
                && stored.authorized_at > tokens.authorized_at
            {
                // A newer consent replaced these tokens meanwhile; nothing to store.
                return Ok(());
            }
            latest
        };
        write_secret(ctx, obj, settings, tokens, current.as_ref())
            .await
            .map(|_| ())
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_total_delay(Some(STORE_RETRY_WINDOW))
                .without_max_times(),
        )
        .when(|e: &Error| !matches!(e, Error::SecretConflict(_)))
        .notify(|e, delay| debug!(error = %e, ?delay, "storing refreshed tokens failed; retrying"))
        .await
}
