//! Act: carry out a [`Plan`]: write the token Secret, delete the previous one after a rename,
//! and send the token request (a refresh, or a personal access token exchange). Every write is conditional on what was read, by server-side apply
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
    observe::{Observed, TargetSecret},
    plan::{Plan, RefreshOutcome, SecretWrite, TokenRequest},
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
    if let Some(current) = &plan.tokens {
        match &plan.write {
            Some(write) => {
                let written =
                    match write_secret(ctx, &o.obj, settings, current, o.target.as_ref()).await {
                        Ok(written) => written,
                        Err(e) => return Err(Error::TokensUnstored(e.to_string())),
                    };
                ctx.memory.with(&o.keys.uid, |m| {
                    m.held = Some(HeldTokens::written(
                        current,
                        written.metadata.resource_version,
                        ctx.secrets.term(),
                    ));
                });
                if let SecretWrite::Move { from } = write {
                    delete_owned_secret(ctx, &o.obj, &o.keys.namespace, from).await?;
                }
                info!(?write, "token Secret written");
            }
            // No write: the target Secret holds exactly these tokens.
            None if !o.conflict => remember_read(ctx, o, current),
            None => {}
        }
    }
    let (Some(planned), Some(Ok(credentials))) = (plan.refresh, &o.credentials) else {
        return Ok(None);
    };
    let pat = match &o.personal_access_token {
        Some(Ok(pat)) => Some(pat.value.expose_secret()),
        _ => None,
    };
    let request = Request {
        ctx,
        o,
        settings,
        credentials,
        refresh_request: plan.refresh_request.clone(),
    };
    match (planned.request, &plan.tokens, pat) {
        (TokenRequest::Refresh { then_pat }, Some(current), _) => {
            match (request.refresh(current).await?, then_pat, pat) {
                (RefreshOutcome::Rejected { error }, true, Some(pat)) => {
                    info!("refresh token rejected; exchanging the personal access token instead");
                    let then = request.exchange_personal_access_token(pat).await?;
                    Ok(Some(RefreshOutcome::AfterRejection {
                        error,
                        then: Box::new(then),
                    }))
                }
                (outcome, _, _) => Ok(Some(outcome)),
            }
        }
        (TokenRequest::PersonalAccessToken, _, Some(pat)) => {
            request.exchange_personal_access_token(pat).await.map(Some)
        }
        _ => Ok(None),
    }
}

/// Holds the tokens the target Secret holds at the version read. Tokens already held as stored
/// at that version are those very tokens (what `observe` relies on too): they stay as they are,
/// with the moment of this replica's write and when it last saw them.
fn remember_read(ctx: &Context, o: &Observed, tokens: &StoredTokens) {
    let resource_version = o.target.as_ref().and_then(|t| t.resource_version.clone());
    let term = ctx.secrets.term();
    ctx.memory.with(&o.keys.uid, |m| {
        if m.held
            .as_ref()
            .is_some_and(|h| h.stored() && h.resource_version == resource_version)
        {
            return;
        }
        m.held = Some(HeldTokens::new(tokens, true, resource_version, None, term));
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
    current: Option<&TargetSecret>,
) -> Result<Secret> {
    let namespace = obj
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    if tokens.access_token.expose_secret().is_empty() {
        // Stored tokens are held without their access token and never written back (`plan`
        // restores by a refresh instead); a blank one would break every pod mounting the Secret.
        return Err(Error::TokensUnstored("no access token to write".into()));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut desired = desired_secret(obj, settings, tokens);
    let params = match current {
        Some(existing) => {
            if !existing.owned {
                return Err(Error::SecretConflict(format!(
                    "Secret {namespace}/{} exists and is not owned by this GoToOAuthClient",
                    settings.secret_name
                )));
            }
            desired.metadata.resource_version = existing.resource_version.clone();
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

/// One token request for one client, with what every grant needs.
struct Request<'a> {
    ctx: &'a Context,
    o: &'a Observed,
    settings: &'a ClientSettings,
    credentials: &'a ClientCredentials,
    refresh_request: Option<String>,
}

impl Request<'_> {
    /// Sends one request: bounded in concurrency, rate-limited, and only while this replica
    /// leads. `None`: this replica does not hold the Lease, nothing was sent.
    ///
    /// Every wait (a refresh slot, the rate limiter, the Lease GET) comes before the request,
    /// never between its response and the Secret write (see [`Request::store`]); the slot is
    /// released when the response is in, so the write waits for no one either.
    async fn send<F, Fut>(
        &self,
        send: F,
    ) -> Result<Option<Result<crate::goto::TokenResponse, OAuthError>>>
    where
        F: FnOnce(crate::goto::Permit) -> Fut,
        Fut: std::future::Future<Output = Result<crate::goto::TokenResponse, OAuthError>>,
    {
        let _slot = self
            .ctx
            .refresh_slots
            .acquire()
            .await
            .map_err(|_| Error::TokensUnstored("shutting down".into()))?;
        let permit = self.ctx.goto.permit().await;
        if !self.ctx.leadership.confirm().await? {
            warn!("not holding the leader Lease; token request not sent");
            return Ok(None);
        }
        Ok(Some(send(permit).await))
    }

    fn count(&self, result: RefreshResult) {
        let keys = &self.o.keys;
        self.ctx
            .metrics
            .count_refresh(&keys.namespace, &keys.name, result);
    }

    /// One refresh, storing a rotated refresh token before anything else can happen to it.
    async fn refresh(&self, current: &StoredTokens) -> Result<RefreshOutcome> {
        let Some(refresh_token) = &current.refresh_token else {
            return Ok(RefreshOutcome::Rejected {
                error: "no refresh token is stored".into(),
            });
        };
        let (ctx, settings) = (self.ctx, self.settings);
        let sent = self
            .send(|permit| {
                ctx.goto.refresh(
                    permit,
                    settings.token_url.as_str(),
                    self.credentials,
                    refresh_token.expose_secret(),
                )
            })
            .await?;
        let Some(response) = sent else {
            return Ok(RefreshOutcome::NotLeader);
        };
        // The rotation window opens: GoTo may have invalidated the refresh token just sent.
        let received = std::time::Instant::now();
        let now = ctx.clock.now();
        match response {
            Ok(response) => {
                let new = StoredTokens::from_response(&response, Some(current), settings, now)
                    .map_err(|e| Error::TokensUnstored(e.to_string()))?;
                self.store(new, received).await.map(|new| {
                    info!(expires_at = %new.expires_at, "access token refreshed");
                    RefreshOutcome::Refreshed(Box::new(new))
                })
            }
            Err(e) if e.needs_reauthorization() => {
                self.rejected(&e);
                warn!(error = %e, "refresh token rejected; a new authorization is required");
                Ok(RefreshOutcome::Rejected {
                    error: e.to_string(),
                })
            }
            Err(e) => Ok(self.failed(e, current.expires_at.duration_since(now), now)),
        }
    }

    /// One personal access token exchange: new tokens, stored like a refresh's.
    async fn exchange_personal_access_token(&self, pat: &str) -> Result<RefreshOutcome> {
        let (ctx, settings) = (self.ctx, self.settings);
        let sent = self
            .send(|permit| {
                ctx.goto.exchange_personal_access_token(
                    permit,
                    settings.token_url.as_str(),
                    self.credentials,
                    pat,
                )
            })
            .await?;
        let Some(response) = sent else {
            return Ok(RefreshOutcome::NotLeader);
        };
        let received = std::time::Instant::now();
        let now = ctx.clock.now();
        match response {
            Ok(response) => {
                let new = StoredTokens::from_personal_access_token(&response, settings, now);
                self.store(new, received).await.map(|new| {
                    info!(
                        expires_at = %new.expires_at,
                        refresh_token = new.refresh_token.is_some(),
                        "tokens obtained with the personal access token"
                    );
                    RefreshOutcome::Obtained(Box::new(new))
                })
            }
            Err(e) if e.needs_reauthorization() => {
                self.rejected(&e);
                warn!(error = %e, "personal access token rejected; waiting for it or the spec to change");
                Ok(RefreshOutcome::PatRejected {
                    error: e.to_string(),
                })
            }
            // Without tokens there is no lifetime to cap the backoff with.
            Err(e) => {
                let left = self
                    .o
                    .stored
                    .as_ref()
                    .map(|t| t.expires_at.duration_since(now))
                    .unwrap_or(jiff::SignedDuration::from_hours(1));
                Ok(self.failed(e, left, now))
            }
        }
    }

    /// Holds new tokens in memory first, then writes them: if the write fails, the next
    /// reconcile writes them again and sends no second request.
    ///
    /// Between the token response (`received`) and the Secret write there is nothing but that
    /// memory entry (a synchronous lock held for a field assignment): the Lease was confirmed
    /// and the rate-limit and concurrency permits were taken before the request
    /// ([`Request::send`]), and the metrics, the log line, the status write and any Events
    /// all come after the write. A process killed inside this window loses a rotated refresh
    /// token, so nothing that can wait may sit in it.
    async fn store(&self, new: StoredTokens, received: std::time::Instant) -> Result<StoredTokens> {
        let (ctx, keys) = (self.ctx, &self.o.keys);
        ctx.memory.with(&keys.uid, |m| {
            m.held = Some(HeldTokens::new(&new, false, None, None, ctx.secrets.term()));
            m.answered_refresh_request = self.refresh_request.clone();
            m.backoff.refresh_failures = 0;
            m.backoff.not_before = None;
            m.backoff.last_failure = None;
        });
        let stored = store_refreshed(
            ctx,
            &self.o.obj,
            self.settings,
            &new,
            self.o.target.as_ref(),
        )
        .await;
        // The window has closed (or the write failed): only now the bookkeeping.
        self.count(RefreshResult::Success);
        match stored {
            Ok(version) => {
                ctx.metrics
                    .token_store_duration
                    .observe(received.elapsed().as_secs_f64());
                ctx.memory.with(&keys.uid, |m| {
                    if let Some(held) = &mut m.held {
                        held.now_stored(version, ctx.secrets.term());
                    }
                });
                Ok(new)
            }
            Err(e) => {
                warn!(error = %e, "new tokens not stored yet; retrying the write");
                Err(Error::TokensUnstored(e.to_string()))
            }
        }
    }

    /// Records a grant GoTo rejected: no backoff (nothing is retried until a change).
    fn rejected(&self, e: &OAuthError) {
        self.count(match e {
            OAuthError::InvalidClient { .. } => RefreshResult::InvalidClient,
            _ => RefreshResult::InvalidGrant,
        });
        self.ctx.memory.with(&self.o.keys.uid, |m| {
            m.answered_refresh_request = self.refresh_request.clone();
            m.backoff.refresh_failures = 0;
            m.backoff.not_before = None;
            m.backoff.last_failure = None;
        });
    }

    /// Records a transient failure and when to try again; `left` is the current token's
    /// remaining life, which caps the backoff.
    fn failed(&self, e: OAuthError, left: jiff::SignedDuration, now: Timestamp) -> RefreshOutcome {
        let retry_after = match &e {
            OAuthError::RateLimited { retry_after } => *retry_after,
            _ => None,
        };
        self.count(if matches!(e, OAuthError::RateLimited { .. }) {
            RefreshResult::RateLimited
        } else {
            RefreshResult::TransientError
        });
        let (attempt, retry_at) = self.ctx.memory.with(&self.o.keys.uid, |m| {
            m.backoff.refresh_failures += 1;
            let delay = schedule::backoff(m.backoff.refresh_failures, retry_after, left);
            let at: Timestamp = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
            m.backoff.not_before = Some(at);
            m.backoff.last_failure = Some(e.to_string());
            (m.backoff.refresh_failures, at)
        });
        warn!(error = %e, attempt, retry_at = %retry_at, "token request failed; will retry");
        RefreshOutcome::Failed {
            message: e.to_string(),
            retry_at,
        }
    }
}

/// Writes refreshed tokens, retrying transient failures for up to [`STORE_RETRY_WINDOW`] and
/// re-reading the Secret before each retry (a conflict means it changed meanwhile). Returns
/// the version written; `None` when a newer consent had replaced the tokens meanwhile.
async fn store_refreshed(
    ctx: &Context,
    obj: &GoToOAuthClient,
    settings: &ClientSettings,
    tokens: &StoredTokens,
    target: Option<&TargetSecret>,
) -> Result<Option<String>> {
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
                return Ok(None);
            }
            latest.map(|s| TargetSecret::of(&s, obj))
        };
        write_secret(ctx, obj, settings, tokens, current.as_ref())
            .await
            .map(|written| written.metadata.resource_version)
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
