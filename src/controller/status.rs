//! Status: the one place a `GoToOAuthClient`'s status is computed and written.
//!
//! [`desired_status`] turns a settled [`Plan`] (what was written and what the refresh did) into
//! the full status, conditions included; the reconciler and the consent callback both use it,
//! so they cannot disagree. [`apply_status`] writes it only when it differs, conditional on the
//! resourceVersion read, and publishes an Event only when a condition changed.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
};
use tracing::warn;

use super::{Context, observe::ObjectKeys, plan::Plan};
use crate::{
    Result,
    conditions::{self, Observation, Reason, TokenFacts},
    consent::authorization_url,
    metrics::Metrics,
    resource::{GoToOAuthClient, GoToOAuthClientStatus, MANAGER},
    validation::Defaults,
};

fn time(ts: Timestamp) -> Time {
    Time(ts.round(jiff::Unit::Second).unwrap_or(ts))
}

/// The full status for `obj` after `plan` was carried out. `link_token` is the link to
/// publish (the plan's kept one, or a fresh one), `None` to publish none.
pub(crate) fn desired_status(
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    plan: &Plan,
    link_token: Option<&str>,
    defaults: &Defaults,
    now: Timestamp,
) -> GoToOAuthClientStatus {
    let existing = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = obj.metadata.generation;
    let tokens = plan.tokens.as_ref();
    let observation = Observation {
        blocker: plan.blocker.clone(),
        tokens: tokens.map(|t| TokenFacts {
            expires_at: t.expires_at,
        }),
        authorization: plan.authorization.clone(),
        refresh_failure: plan.refresh_failure.clone(),
        secret_lost: plan.secret_lost,
    };
    let mut desired = conditions::desired_conditions(&observation, now).to_vec();
    desired.extend(plan.rollout.as_ref().map(super::rollout::condition));
    GoToOAuthClientStatus {
        conditions: conditions::merge_conditions(existing, &desired, generation, now),
        authorization_url: link_token.map(|t| authorization_url(defaults, keys, t)),
        authorization: Some(plan.authorization.to_status()),
        access_token_expires_at: tokens.map(|t| time(t.expires_at)),
        last_refresh_time: tokens.map(|t| time(t.issued_at)),
        next_refresh_time: plan.next_refresh.map(time),
        refresh_token_obtained_at: tokens.map(|t| time(t.refresh_token_obtained_at)),
        principal: tokens.and_then(|t| t.principal.clone()),
        account_key: tokens.and_then(|t| t.account_key.clone()),
        organizer_key: tokens.and_then(|t| t.organizer_key.clone()),
        secret_name: plan.secret_name.clone(),
        obtained_by: tokens.map(|t| t.obtained_by),
        rejected_personal_access_token: plan.rejected_personal_access_token.clone(),
        handled_link_rotation: plan.handled_link_rotation.clone(),
        handled_refresh_request: plan.handled_refresh_request.clone(),
        rejected_authorization: plan.rejected_authorization.map(time),
        consumed_states: plan
            .consumed_states
            .iter()
            .filter(|c| c.expires_at > now.as_second())
            .cloned()
            .collect(),
        rollout_restart: plan.rollout.clone().map(Box::new),
        observed_generation: generation,
    }
}

/// Whether `current` claims `Ready=True` where the truthful `desired` status says `Ready=False`:
/// typically an access token that expired while no leader kept the status. Such a status is
/// written before a refresh is sent, because the refresh may wait for a rate-limit slot, run
/// into the token timeout or fail, and the status would lie all that time.
pub(crate) fn claims_false_readiness(
    current: Option<&GoToOAuthClientStatus>,
    desired: &GoToOAuthClientStatus,
) -> bool {
    let ready = |s: &GoToOAuthClientStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .map(|c| c.status == "True")
    };
    current.and_then(ready) == Some(true) && ready(desired) == Some(false)
}

/// What an Event is about. [`super::events`] folds repeats of one (type, reason, action)
/// into a series that keeps the first note, so distinct causes get distinct actions: a failed
/// consent, a failed code exchange and a failed refresh never merge into one Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventAction {
    Reconcile,
    Refresh,
    Consent,
    ExchangeCode,
    RolloutRestart,
}

impl EventAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventAction::Reconcile => "Reconcile",
            EventAction::Refresh => "Refresh",
            EventAction::Consent => "Consent",
            EventAction::ExchangeCode => "ExchangeCode",
            EventAction::RolloutRestart => "RolloutRestart",
        }
    }
}

/// Why an Event is published: a condition's new reason, or a consent's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventReason {
    Condition(Reason),
    /// A consent was stored; the note names the GoTo account.
    ConsentGiven,
    /// A consent was stored from another GoTo account than the previous one.
    AccountChanged,
}

impl EventReason {
    fn as_str(self) -> &'static str {
        match self {
            EventReason::Condition(reason) => reason.as_str(),
            EventReason::ConsentGiven => "ConsentGiven",
            EventReason::AccountChanged => "AccountChanged",
        }
    }

    fn is_normal(self) -> bool {
        match self {
            EventReason::Condition(reason) => reason.is_normal(),
            EventReason::ConsentGiven => true,
            EventReason::AccountChanged => false,
        }
    }
}

/// Whether [`apply_status`] publishes an Event for a condition that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Events {
    OnTransition(EventAction),
    /// The caller publishes its own Event (a consent's outcome is always reported).
    Never,
}

/// Writes `status` when it differs from the object's, conditional on the object's
/// resourceVersion. Returns whether it wrote. The per-client metrics follow `status` either way.
pub(crate) async fn apply_status(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    status: GoToOAuthClientStatus,
    events: Events,
) -> Result<bool> {
    record_metrics(&ctx.metrics, keys, &status);
    let current = obj.status.clone().unwrap_or_default();
    if current == status {
        return Ok(false);
    }
    let written = write_status(ctx, keys, obj.metadata.resource_version.clone(), &status).await?;
    ctx.memory.with(&keys.uid, |m| {
        m.written_resource_version = written
            .metadata
            .resource_version
            .clone()
            .map(|rv| (rv, std::time::Instant::now()));
    });

    if let Events::OnTransition(action) = events {
        for condition in conditions::transitions(&current.conditions, &status.conditions) {
            let Some(reason) = Reason::parse(&condition.reason) else {
                continue;
            };
            let action = match condition.type_ == conditions::ROLLOUT_TARGETS_UP_TO_DATE {
                true => EventAction::RolloutRestart,
                false => action,
            };
            publish(
                ctx,
                obj,
                EventReason::Condition(reason),
                action,
                &condition.message,
            )
            .await;
        }
    }
    Ok(true)
}

/// The per-client series: Ready, the authorization phase, the access token's expiry and the
/// refresh token's issue time, from the status the leader writes (at once, before the watch
/// brings it back). Every replica also sets them from its own watch (`client_cache`).
fn record_metrics(metrics: &Metrics, keys: &ObjectKeys, status: &GoToOAuthClientStatus) {
    metrics.observe_client(&keys.namespace, &keys.name, Some(status));
}

/// Publishes an Event; failures are logged, never fatal (events are best effort).
pub(crate) async fn publish(
    ctx: &Context,
    obj: &GoToOAuthClient,
    reason: EventReason,
    action: EventAction,
    note: &str,
) {
    let event = Event {
        type_: if reason.is_normal() {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: reason.as_str().to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.as_str().into(),
        secondary: None,
    };
    if let Err(e) = ctx.events.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

/// Writes a full status by server-side apply, conditional on `resource_version`.
pub(crate) async fn write_status(
    ctx: &Context,
    keys: &ObjectKeys,
    resource_version: Option<String>,
    status: &GoToOAuthClientStatus,
) -> Result<GoToOAuthClient> {
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let patch = serde_json::json!({
        "apiVersion": GoToOAuthClient::api_version(&()),
        "kind": GoToOAuthClient::kind(&()),
        "metadata": { "name": keys.name, "resourceVersion": resource_version },
        "status": status,
    });
    Ok(api
        .patch_status(
            &keys.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;
    use secrecy::SecretString;

    use super::*;
    use crate::{
        controller::{
            fixtures::settings,
            plan::{Plan, RefreshOutcome},
        },
        goto::TokenResponse,
        metrics::Metrics,
        secret::StoredTokens,
    };

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn response(refresh: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: SecretString::from("access"),
            refresh_token: refresh.map(SecretString::from),
            token_type: None,
            expires_in: Some(3600),
            scope: None,
            principal: Some("admin@example.com".into()),
            email: None,
            account_key: None,
            organizer_key: None,
            account_type: None,
            first_name: None,
            last_name: None,
        }
    }

    fn client() -> (GoToOAuthClient, ObjectKeys, Defaults) {
        let (obj, keys) = crate::controller::fixtures::demo_client();
        let defaults = Defaults {
            public_url: "https://op.example".parse().unwrap(),
            authorize_url: "https://auth.example/oauth/authorize".parse().unwrap(),
            token_url: "https://auth.example/oauth/token".parse().unwrap(),
            allowed_hosts: Vec::new(),
        };
        (obj, keys, defaults)
    }

    /// A status written while the token was valid claims Ready falsely once the token expired
    /// (no leader rewrote it); the status of the same tokens at that time says TokenExpired.
    #[test]
    fn a_ready_status_for_an_expired_token_is_stale() {
        let (mut obj, keys, defaults) = client();
        let s = settings();
        let consent = at("2026-11-01T10:00:00Z");
        let tokens = StoredTokens::from_response(&response(Some("r1")), None, &s, consent).unwrap();
        let plan = Plan::after_consent(&obj, &s, tokens, "uid-1");
        let written = desired_status(&obj, &keys, &plan, None, &defaults, consent);
        obj.status = Some(written.clone());

        let later = |mins| {
            let now = consent + SignedDuration::from_mins(mins);
            desired_status(&obj, &keys, &plan, None, &defaults, now)
        };
        assert!(
            !claims_false_readiness(Some(&written), &later(30)),
            "still valid"
        );
        let expired = later(61);
        let ready = expired
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::READY)
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TokenExpired")
        );
        assert!(claims_false_readiness(Some(&written), &expired));
        assert!(
            !claims_false_readiness(Some(&expired), &expired),
            "corrected"
        );
        assert!(
            !claims_false_readiness(None, &expired),
            "no status: nothing claimed"
        );
    }

    /// `refreshTokenObtainedAt` is set at consent, kept by a refresh that returns no refresh
    /// token, and moved by one that returns a new one; the metric follows the status.
    #[test]
    fn refresh_token_obtained_at_follows_the_stored_refresh_token() {
        let (obj, keys, defaults) = client();
        let s = settings();
        let consent = at("2026-11-01T10:00:00Z");
        let first = StoredTokens::from_response(&response(Some("r1")), None, &s, consent).unwrap();
        let plan = Plan::after_consent(&obj, &s, first.clone(), "uid-1");
        let status = desired_status(&obj, &keys, &plan, None, &defaults, consent);
        assert_eq!(status.refresh_token_obtained_at, Some(Time(consent)));

        let later = consent + SignedDuration::from_mins(40);
        let kept = StoredTokens::from_response(&response(None), Some(&first), &s, later).unwrap();
        let plan = plan.settle(
            Some(RefreshOutcome::Refreshed(Box::new(kept.clone()))),
            Some(&s),
            "uid-1",
            later,
        );
        let status = desired_status(&obj, &keys, &plan, None, &defaults, later);
        assert_eq!(status.last_refresh_time, Some(Time(later)));
        assert_eq!(status.refresh_token_obtained_at, Some(Time(consent)));

        let rotated_at = later + SignedDuration::from_mins(40);
        let rotated =
            StoredTokens::from_response(&response(Some("r2")), Some(&kept), &s, rotated_at)
                .unwrap();
        let plan = plan.settle(
            Some(RefreshOutcome::Refreshed(Box::new(rotated))),
            Some(&s),
            "uid-1",
            rotated_at,
        );
        let status = desired_status(&obj, &keys, &plan, None, &defaults, rotated_at);
        assert_eq!(status.refresh_token_obtained_at, Some(Time(rotated_at)));

        let metrics = Metrics::default();
        record_metrics(&metrics, &keys, &status);
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "goto_oauth_refresh_token_obtained_timestamp_seconds{{namespace=\"ns\",name=\"demo\"}} {}",
                rotated_at.as_second()
            )),
            "{text}"
        );
        let text = metrics.render();
        assert!(text.contains(
            "goto_oauth_client_authorization_phase{namespace=\"ns\",name=\"demo\",phase=\"Authorized\"} 1"
        ));

        // No tokens: no series (a deleted Secret, before a consent).
        record_metrics(&metrics, &keys, &GoToOAuthClientStatus::default());
        assert!(
            !metrics
                .render()
                .contains("refresh_token_obtained_timestamp_seconds{")
        );
    }
}
