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
        observe::TargetSecret,
        plan::Plan,
        status::{
            EventAction, EventReason, Events, apply_status, desired_status, publish, write_status,
        },
    },
    goto::{OAuthError, TokenResponse},
    resource::{ConsumedState, GoToOAuthClient, GoToOAuthClientStatus},
    secret::StoredTokens,
    validation::ClientSettings,
};

/// Authorization attempts one client may have in flight (claimed and not yet expired): enough
/// for people who retry, small enough that the status stays small whatever a browser does.
pub(crate) const MAX_ATTEMPTS_IN_FLIGHT: usize = 20;

/// How long a consumed nonce is kept past its state's expiry: replicas' clocks differ, and a
/// replica whose clock is behind must still find the nonce while it takes the state as valid.
pub(crate) const CLOCK_SKEW_MARGIN_SECONDS: i64 = 120;

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
    /// [`MAX_ATTEMPTS_IN_FLIGHT`] attempts are recorded already; try again later.
    TooMany,
}

/// Records an attempt's nonce as consumed, exactly once across all replicas.
pub(crate) async fn claim(
    ctx: &Context,
    keys: &ObjectKeys,
    read: GoToOAuthClient,
    nonce: &str,
    expires_at: i64,
) -> Result<Claim> {
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let now = ctx.clock.now().as_second();
    // The caller's read is the first try; after a conflict the object is read again.
    let first = std::sync::Mutex::new(Some(read));
    let attempt = || async {
        let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let obj = match taken {
            Some(obj) => obj,
            None => match api.get_opt(&keys.name).await? {
                Some(obj) => obj,
                None => return Ok(Claim::Gone),
            },
        };
        if obj.metadata.uid.as_deref() != Some(keys.uid.as_str()) {
            return Ok(Claim::Gone);
        }
        let mut status = obj.status.clone().unwrap_or_default();
        if status.consumed_states.iter().any(|c| c.nonce == nonce) {
            return Ok(Claim::Replayed);
        }
        status.consumed_states.retain(|c| c.expires_at > now);
        if status.consumed_states.len() >= MAX_ATTEMPTS_IN_FLIGHT {
            return Ok(Claim::TooMany);
        }
        status.consumed_states.push(ConsumedState {
            nonce: nonce.to_string(),
            expires_at: expires_at.saturating_add(CLOCK_SKEW_MARGIN_SECONDS),
        });
        let updated =
            write_status(ctx, keys, obj.metadata.resource_version.clone(), &status).await?;
        Ok(Claim::Claimed(Box::new(updated)))
    };
    attempt.retry(on_conflict(4)).when(Error::is_conflict).await
}

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
    // This replica's reconciles wait until the status below is written (or a moment passes).
    ctx.memory.with(&keys.uid, |m| {
        m.consent_in_flight = Some(std::time::Instant::now())
    });
    let store = || async {
        let current = secrets
            .get_opt(&settings.secret_name)
            .await?
            .map(|s| TargetSecret::of(&s, obj));
        write_secret(ctx, obj, settings, &tokens, current.as_ref()).await
    };
    let written = match store.retry(on_conflict(2)).when(Error::is_conflict).await {
        Ok(written) => written,
        Err(e) => {
            ctx.memory.with(&keys.uid, |m| m.consent_in_flight = None);
            return Err(match e {
                e if e.is_conflict() => {
                    Error::TokensUnstored("the token Secret kept changing".into())
                }
                e => e,
            });
        }
    };
    ctx.memory.with(&keys.uid, |m| {
        m.held = Some(HeldTokens::written(
            &tokens,
            written.metadata.resource_version,
            ctx.secrets.term(),
        ));
        m.backoff = Default::default();
    });

    let written = write_from_latest(ctx, obj, keys, |latest| {
        let plan = Plan::after_consent(latest, settings, tokens.clone(), &keys.uid);
        // The used link is spent; the next re-authorization gets a fresh one.
        let link = plan.link.resolve(|| random_token(32));
        Some(desired_status(
            latest,
            keys,
            &plan,
            link.as_deref(),
            &ctx.settings.defaults,
            now,
        ))
    })
    .await;
    ctx.memory.with(&keys.uid, |m| m.consent_in_flight = None);
    if let Err(e) = written {
        // The Secret holds the tokens; the leader's reconcile derives the status from it.
        warn!(error = %e, "authorization stored, status not updated yet");
    }
    info!(namespace = %keys.namespace, name = %keys.name, "authorization stored");
    let (reason, note) = consent_event(obj.status.as_ref(), &tokens);
    publish(ctx, obj, reason, EventAction::Consent, &note).await;
    Ok(Completed {
        tokens,
        secret_name: settings.secret_name.clone(),
    })
}

/// Writes the status `status_of` computes from the client: first from `obj` (the latest this
/// replica knows), and after a conflict (the controller wrote meanwhile, say after a spec
/// change) from the client read again, up to four more times. A status lost to a conflict would
/// leave a refused consent without its condition. `Ok(false)`: nothing written (no change,
/// `status_of` had none, or the client is gone or was replaced). The Event that follows tells
/// what happened; the conditions' transitions would only repeat it.
async fn write_from_latest(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    status_of: impl Fn(&GoToOAuthClient) -> Option<GoToOAuthClientStatus>,
) -> Result<bool> {
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let first = std::sync::atomic::AtomicBool::new(true);
    let write = || async {
        let latest = if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
            obj.clone()
        } else {
            match api.get_opt(&keys.name).await? {
                Some(latest) if latest.metadata.uid.as_deref() == Some(keys.uid.as_str()) => latest,
                _ => return Ok(false),
            }
        };
        match status_of(&latest) {
            Some(status) => apply_status(ctx, &latest, keys, status, Events::Never).await,
            None => Ok(false),
        }
    };
    write.retry(on_conflict(4)).when(Error::is_conflict).await
}

/// Records a failed attempt: `Authorized` (and `Ready`) carry the failure only while no tokens
/// are stored, so a failed attempt never spoils a working client; an Event always.
pub(crate) async fn record_failure(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    failure: ConsentFailure,
    action: EventAction,
    message: &str,
) -> Result<()> {
    let written = write_from_latest(ctx, obj, keys, |latest| {
        let status = latest.status.clone().unwrap_or_default();
        if status.access_token_expires_at.is_some() {
            return None;
        }
        let plan = Plan::failed_consent(
            &status,
            Authorization::ConsentFailed {
                failure,
                message: message.to_string(),
            },
        );
        let link = plan.link.resolve(|| random_token(32));
        Some(desired_status(
            latest,
            keys,
            &plan,
            link.as_deref(),
            &ctx.settings.defaults,
            ctx.clock.now(),
        ))
    })
    .await;
    match written {
        Ok(_) => {}
        // Someone kept writing the status; the Event below still tells the failure.
        Err(e) if e.is_conflict() => warn!(error = %e, "failed consent not recorded in status"),
        Err(e) => return Err(e),
    }
    publish(
        ctx,
        obj,
        EventReason::Condition(failure.reason()),
        action,
        message,
    )
    .await;
    Ok(())
}

/// How an account is named in Events and pages: principal and account key, never a token.
fn account(principal: Option<&str>, account_key: Option<&str>) -> String {
    match (principal, account_key) {
        (Some(p), Some(k)) => format!("GoTo account {p} (account key {k})"),
        (Some(p), None) => format!("GoTo account {p}"),
        (None, Some(k)) => format!("GoTo account key {k}"),
        (None, None) => "a GoTo account that GoTo did not name".into(),
    }
}

/// The Event for a stored consent: which account gave it, and a warning when it is not the
/// account of the consent it replaces.
fn consent_event(
    before: Option<&crate::resource::GoToOAuthClientStatus>,
    tokens: &StoredTokens,
) -> (EventReason, String) {
    let new = account(tokens.principal.as_deref(), tokens.account_key.as_deref());
    let previous = before.filter(|s| s.principal.is_some() || s.account_key.is_some());
    match previous {
        Some(old)
            if !same_account(
                (old.principal.as_deref(), old.account_key.as_deref()),
                (tokens.principal.as_deref(), tokens.account_key.as_deref()),
            ) =>
        {
            (
                EventReason::AccountChanged,
                format!(
                    "consent given by {new}; the tokens it replaces were authorized by {}",
                    account(old.principal.as_deref(), old.account_key.as_deref())
                ),
            )
        }
        _ => (EventReason::ConsentGiven, format!("consent given by {new}")),
    }
}

/// Whether two (principal, account key) pairs name the same account: the account key when
/// both have one, else the principal (e-mail addresses compare case-insensitively).
fn same_account(a: (Option<&str>, Option<&str>), b: (Option<&str>, Option<&str>)) -> bool {
    match ((a.1, b.1), (a.0, b.0)) {
        ((Some(x), Some(y)), _) => x == y,
        (_, (Some(x), Some(y))) => x.eq_ignore_ascii_case(y),
        _ => false,
    }
}

/// Whether a consent's account is the one `spec.expectedAccount` names (an e-mail compared
/// case-insensitively with the principal, or an account key compared exactly).
pub(crate) fn is_expected_account(
    expected: &str,
    principal: Option<&str>,
    account_key: Option<&str>,
) -> bool {
    let expected = expected.trim();
    principal.is_some_and(|p| p.eq_ignore_ascii_case(expected))
        || account_key.is_some_and(|k| k == expected)
}

/// Names the account of a token response, for the refusal of an unexpected one.
pub(crate) fn describe_account(response: &TokenResponse) -> String {
    let principal = response.principal.as_deref().or(response.email.as_deref());
    account(principal, response.account_key.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::GoToOAuthClientStatus;
    use secrecy::SecretString;

    fn tokens(principal: Option<&str>, key: Option<&str>) -> StoredTokens {
        let now = jiff::Timestamp::UNIX_EPOCH;
        StoredTokens {
            access_token: SecretString::from("a"),
            refresh_token: Some(SecretString::from("r")),
            token_type: "Bearer".into(),
            expires_at: now,
            issued_at: now,
            authorized_at: now,
            refresh_token_obtained_at: now,
            scope: None,
            principal: principal.map(str::to_string),
            account_key: key.map(str::to_string),
            organizer_key: None,
            client_id: "c".into(),
            token_url: "t".into(),
            obtained_by: Default::default(),
        }
    }

    fn status(principal: Option<&str>, key: Option<&str>) -> GoToOAuthClientStatus {
        GoToOAuthClientStatus {
            principal: principal.map(str::to_string),
            account_key: key.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn consent_events_name_the_account_and_warn_on_a_change() {
        let (reason, note) = consent_event(None, &tokens(Some("a@example.com"), Some("111")));
        assert_eq!(reason, EventReason::ConsentGiven);
        assert_eq!(
            note,
            "consent given by GoTo account a@example.com (account key 111)"
        );

        let same = consent_event(
            Some(&status(Some("A@Example.com"), None)),
            &tokens(Some("a@example.com"), None),
        );
        assert_eq!(same.0, EventReason::ConsentGiven);

        let (reason, note) = consent_event(
            Some(&status(Some("a@example.com"), Some("111"))),
            &tokens(Some("b@example.com"), Some("222")),
        );
        assert_eq!(reason, EventReason::AccountChanged);
        assert!(
            note.contains("b@example.com") && note.contains("a@example.com"),
            "{note}"
        );
    }

    #[test]
    fn expected_account_by_email_or_key() {
        assert!(is_expected_account(
            " Admin@Example.com ",
            Some("admin@example.com"),
            None
        ));
        assert!(is_expected_account("4242", None, Some("4242")));
        assert!(!is_expected_account(
            "4242",
            Some("4242x@example.com"),
            Some("42")
        ));
        assert!(!is_expected_account("admin@example.com", None, None));
    }
}
