//! Rollout restarts: restart the workloads that read the token Secret only at start
//! (`spec.rolloutRestartTargets`) when the tokens change in a way they need, at most once per
//! `spec.rolloutRestartMinInterval`.
//!
//! What counts as a change is read from the stored tokens' own timestamps (consent, refresh
//! token, access token), and what the targets are up to date with is `status.rolloutRestart`:
//! so a restart happens once per change across restarts and fail-overs of the operator, and an
//! hourly refresh never rolls a fleet unless `AccessToken` is asked for. [`decide`] is pure and
//! table-tested; [`restart`] patches the targets like `kubectl rollout restart` does.
//!
//! Only the leader's reconcile restarts (after the refreshed tokens are stored); the consent
//! callback, which any unauthenticated browser can reach, never does: it only carries the record.

use std::{collections::BTreeSet, time::Duration};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::apps::v1::{DaemonSet, Deployment, StatefulSet},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType},
};
use tracing::{info, warn};

use super::{Context, status::EventAction};
use crate::{
    conditions::{DesiredCondition, ROLLOUT_TARGETS_UP_TO_DATE, Reason, cond},
    resource::{
        FailedRestartTarget, GoToOAuthClient, MANAGER, RestartProblem, RolloutRestartStatus,
        RolloutRestartTarget, RolloutRestartTrigger, TokenGrant, WorkloadKind,
    },
    secret::StoredTokens,
    validation::RolloutSettings,
};

/// The pod-template annotation a restart sets (as `kubectl rollout restart` sets
/// `kubectl.kubernetes.io/restartedAt`): a new value rolls the workload's pods.
pub const RESTARTED_AT_ANNOTATION: &str = "goto-oauth.dev/restartedAt";

/// The newest change of the stored tokens among the kinds `on` names, and its kind. A consent
/// also issues a refresh and an access token; it counts as `Authorization` when that is asked
/// for, so one change is reported once, by its most specific kind.
///
/// Tokens of a personal access token grant that came without a refresh token are renewed by
/// exchanging the PAT again, about hourly: each exchange is a new grant, but to a consumer it
/// is only a new access token, so it counts as `AccessToken` (and never as a rotation).
pub(crate) fn latest_change(
    tokens: &StoredTokens,
    on: &BTreeSet<RolloutRestartTrigger>,
) -> Option<(Timestamp, RolloutRestartTrigger)> {
    let renewed_by_pat =
        tokens.obtained_by == TokenGrant::PersonalAccessToken && tokens.refresh_token.is_none();
    let authorization =
        (!renewed_by_pat).then_some((tokens.authorized_at, RolloutRestartTrigger::Authorization));
    let rotation = tokens.refresh_token.is_some().then_some((
        tokens.refresh_token_obtained_at,
        RolloutRestartTrigger::RefreshTokenRotation,
    ));
    [
        authorization,
        rotation,
        Some((tokens.issued_at, RolloutRestartTrigger::AccessToken)),
    ]
    .into_iter()
    .flatten()
    .filter(|(_, trigger)| on.contains(trigger))
    // Later times win; at equal times the earlier entry (the more specific kind) wins.
    .reduce(|best, next| if next.0 > best.0 { next } else { best })
}

/// Every kind of change: the first tokens restart the targets whatever `on` says, since
/// pods started before them had none.
fn any_change(tokens: &StoredTokens) -> Option<(Timestamp, RolloutRestartTrigger)> {
    let every: BTreeSet<_> = [
        RolloutRestartTrigger::Authorization,
        RolloutRestartTrigger::RefreshTokenRotation,
        RolloutRestartTrigger::AccessToken,
    ]
    .into();
    latest_change(tokens, &every).map(|(at, _)| (at, RolloutRestartTrigger::Authorization))
}

/// What to do about the targets in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// No targets: no record, no condition.
    Off,
    /// The targets are up to date with the tokens (or there are none yet).
    UpToDate(RolloutRestartStatus),
    /// Restart the targets now for this change.
    Restart {
        change: Timestamp,
        trigger: RolloutRestartTrigger,
    },
    /// A change waits for the end of the minimum interval.
    Wait(RolloutRestartStatus),
}

/// Decides from the settings, the record in the status, the tokens the reconcile found
/// (`observed`, the baseline when there is no record yet) and the tokens now stored.
pub(crate) fn decide(
    settings: &RolloutSettings,
    record: Option<&RolloutRestartStatus>,
    observed: Option<&StoredTokens>,
    stored: Option<&StoredTokens>,
    now: Timestamp,
) -> Decision {
    if settings.targets.is_empty() {
        return Decision::Off;
    }
    let change_of = |t: &StoredTokens| latest_change(t, &settings.on);
    // Restarts were just configured: the targets already run with the tokens stored before
    // this reconcile, and only later changes restart them.
    let baseline = RolloutRestartStatus {
        since: time(now),
        handled_change_time: observed.and_then(change_of).map(|(at, _)| time(at)),
        last_restart_time: None,
        last_restart_trigger: None,
        pending_restart_time: None,
        failed_targets: Vec::new(),
    };
    let mut record = record.cloned().unwrap_or(baseline);
    // Failures of targets no longer listed are not this spec's business.
    record.failed_targets.retain(|f| {
        settings
            .targets
            .iter()
            .any(|t| t.kind == f.kind && t.name == f.name)
    });
    let handled = record.handled_change_time.as_ref().map(|t| t.0);
    let change = match handled {
        Some(h) => stored.and_then(change_of).filter(|(at, _)| *at > h),
        None => stored.and_then(any_change),
    };
    let Some((change, trigger)) = change else {
        record.pending_restart_time = None;
        return Decision::UpToDate(record);
    };
    let earliest = record
        .last_restart_time
        .as_ref()
        .and_then(|t| t.0.checked_add(signed(settings.min_interval)).ok());
    match earliest {
        Some(at) if at > now => {
            record.pending_restart_time = Some(time(at));
            Decision::Wait(record)
        }
        _ => Decision::Restart { change, trigger },
    }
}

/// The record after a restart at `now` for `change`, from each target's result. The change is
/// handled when every target was restarted or does not exist (a workload created later starts
/// with the current tokens anyway); otherwise it is retried after the minimum interval.
pub(crate) fn after_restart(
    change: Timestamp,
    trigger: RolloutRestartTrigger,
    previous: Option<&RolloutRestartStatus>,
    results: &[(RolloutRestartTarget, Result<(), RestartProblem>)],
    min_interval: Duration,
    now: Timestamp,
) -> RolloutRestartStatus {
    let failed_targets: Vec<FailedRestartTarget> = results
        .iter()
        .filter_map(|(target, result)| {
            result.err().map(|problem| FailedRestartTarget {
                kind: target.kind,
                name: target.name.clone(),
                problem,
            })
        })
        .collect();
    let handled = failed_targets
        .iter()
        .all(|f| f.problem == RestartProblem::NotFound);
    RolloutRestartStatus {
        since: previous.map_or_else(|| time(now), |p| p.since.clone()),
        handled_change_time: if handled {
            Some(time(change))
        } else {
            previous.and_then(|p| p.handled_change_time.clone())
        },
        last_restart_time: Some(time(now)),
        last_restart_trigger: Some(trigger),
        pending_restart_time: (!handled)
            .then(|| now.checked_add(signed(min_interval)).ok())
            .flatten()
            .map(time),
        failed_targets,
    }
}

/// The newer of the record in the status and the one this replica remembers from its last
/// restart (whose status write may have failed, or not reached this reconcile's cache yet).
pub(crate) fn newest(
    written: Option<&RolloutRestartStatus>,
    remembered: Option<&RolloutRestartStatus>,
) -> Option<RolloutRestartStatus> {
    let at = |r: &RolloutRestartStatus| r.last_restart_time.as_ref().map(|t| t.0);
    match (written, remembered) {
        (Some(w), Some(r)) if at(r) > at(w) => Some(r.clone()),
        (None, Some(r)) => Some(r.clone()),
        (w, _) => w.cloned(),
    }
}

/// When the record asks for the next look: a waiting or retried restart.
pub(crate) fn wake_at(record: Option<&RolloutRestartStatus>) -> Option<Timestamp> {
    record?.pending_restart_time.as_ref().map(|t| t.0)
}

/// Carries out a decision: restarts the targets when it says so. Returns the record to write
/// (`None` when no targets are configured).
pub(crate) async fn reconcile(
    ctx: &Context,
    obj: &GoToOAuthClient,
    settings: &RolloutSettings,
    decision: Decision,
    previous: Option<&RolloutRestartStatus>,
) -> Option<RolloutRestartStatus> {
    match decision {
        Decision::Off => {
            if let Some(uid) = obj.metadata.uid.as_deref() {
                ctx.memory.with(uid, |m| m.rollout = None);
            }
            None
        }
        Decision::UpToDate(record) | Decision::Wait(record) => Some(record),
        Decision::Restart { change, trigger } => {
            let now = ctx.clock.now();
            let mut results = Vec::with_capacity(settings.targets.len());
            for target in &settings.targets {
                let result = restart_target(ctx, obj, target, trigger, now).await;
                results.push((target.clone(), result));
            }
            let record = after_restart(
                change,
                trigger,
                previous,
                &results,
                settings.min_interval,
                now,
            );
            if let Some(uid) = obj.metadata.uid.as_deref() {
                ctx.memory
                    .with(uid, |m| m.rollout = Some(Box::new(record.clone())));
            }
            report(ctx, obj, trigger, &results).await;
            Some(record)
        }
    }
}

/// Restarts one target by setting its pod template's restart annotation. A JSON merge patch,
/// not server-side apply: applying to a workload that does not exist would try to create it,
/// and a merge patch of a missing one is a plain 404.
async fn restart_target(
    ctx: &Context,
    obj: &GoToOAuthClient,
    target: &RolloutRestartTarget,
    trigger: RolloutRestartTrigger,
    now: Timestamp,
) -> Result<(), RestartProblem> {
    let namespace = obj.metadata.namespace.as_deref().unwrap_or_default();
    let patch = serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT_ANNOTATION: time(now).0.to_string(),
        }}}}
    });
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(&patch);
    let client = ctx.client.clone();
    let result = match target.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
            .patch(&target.name, &params, &patch)
            .await
            .map(|d| d.object_ref(&())),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
            .patch(&target.name, &params, &patch)
            .await
            .map(|d| d.object_ref(&())),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
            .patch(&target.name, &params, &patch)
            .await
            .map(|d| d.object_ref(&())),
    };
    match result {
        Ok(reference) => {
            info!(kind = target.kind.as_str(), target = %target.name, trigger = trigger.as_str(), "restarted rollout target");
            let event = Event {
                type_: EventType::Normal,
                reason: "RolloutRestarted".into(),
                note: Some(format!(
                    "Restarted by GoToOAuthClient {}: {}",
                    obj.metadata.name.as_deref().unwrap_or_default(),
                    describe(trigger)
                )),
                action: EventAction::RolloutRestart.as_str().into(),
                secondary: Some(obj.object_ref(&())),
            };
            if let Err(e) = ctx.events.publish(&event, &reference).await {
                warn!(error = %e, "could not publish event");
            }
            Ok(())
        }
        Err(e) => {
            let problem = match &e {
                kube::Error::Api(s) if s.code == 404 => RestartProblem::NotFound,
                kube::Error::Api(s) if s.code == 403 => RestartProblem::Forbidden,
                _ => RestartProblem::Failed,
            };
            warn!(kind = target.kind.as_str(), target = %target.name, error = %e, "could not restart rollout target");
            Err(problem)
        }
    }
}

/// The Event on the client about a restart: what was restarted and why. Targets that could
/// not be restarted are reported by the condition (an Event when it turns to that problem).
async fn report(
    ctx: &Context,
    obj: &GoToOAuthClient,
    trigger: RolloutRestartTrigger,
    results: &[(RolloutRestartTarget, Result<(), RestartProblem>)],
) {
    let restarted: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| target_name(t))
        .collect();
    if restarted.is_empty() {
        return;
    }
    let note = format!("Restarted {}: {}", restarted.join(", "), describe(trigger));
    let event = Event {
        type_: EventType::Normal,
        reason: Reason::RolloutRestarted.as_str().into(),
        note: Some(note.chars().take(1000).collect()),
        action: EventAction::RolloutRestart.as_str().into(),
        secondary: None,
    };
    if let Err(e) = ctx.events.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

/// `RolloutTargetsUpToDate`, from the record alone (the consent callback carries the record
/// and so writes the same condition).
pub(crate) fn condition(record: &RolloutRestartStatus) -> DesiredCondition {
    let failed = |problem: RestartProblem| {
        record
            .failed_targets
            .iter()
            .filter(|f| f.problem == problem)
            .map(|f| format!("{}/{}", f.kind.as_str(), f.name))
            .collect::<Vec<_>>()
    };
    let problem = [
        (RestartProblem::Forbidden, Reason::RestartForbidden),
        (RestartProblem::Failed, Reason::RestartFailed),
        (RestartProblem::NotFound, Reason::RestartTargetNotFound),
    ]
    .into_iter()
    .map(|(p, reason)| (p, reason, failed(p)))
    .find(|(_, _, targets)| !targets.is_empty());
    let retry = record
        .pending_restart_time
        .as_ref()
        .map(|t| format!("; retried at {}", t.0))
        .unwrap_or_default();
    let (ok, reason, message) = match (problem, &record.pending_restart_time) {
        (Some((p, reason, targets)), _) => (
            false,
            reason,
            format!("{}: {}{retry}", targets.join(", "), problem_text(p)),
        ),
        (None, Some(at)) => (
            false,
            Reason::RestartPending,
            format!(
                "the tokens changed; the targets restart at {} (spec.rolloutRestartMinInterval)",
                at.0
            ),
        ),
        (None, None) => match (&record.last_restart_time, record.last_restart_trigger) {
            (Some(at), Some(trigger)) => (
                true,
                Reason::RolloutRestarted,
                format!("restarted at {} because {}", at.0, describe(trigger)),
            ),
            _ => (
                true,
                Reason::NoRestartNeeded,
                "no token change since the restart targets were configured".to_string(),
            ),
        },
    };
    cond(ROLLOUT_TARGETS_UP_TO_DATE, ok, reason, message)
}

pub(crate) fn target_name(target: &RolloutRestartTarget) -> String {
    format!("{}/{}", target.kind.as_str(), target.name)
}

pub(crate) fn problem_text(problem: RestartProblem) -> &'static str {
    match problem {
        RestartProblem::NotFound => "not found",
        RestartProblem::Forbidden => {
            "forbidden: the operator has no RBAC to patch it (see the README, rollout restarts)"
        }
        RestartProblem::Failed => "the API server refused or failed; retried later",
    }
}

/// Why the targets were restarted, for Events and the condition.
pub(crate) fn describe(trigger: RolloutRestartTrigger) -> &'static str {
    match trigger {
        RolloutRestartTrigger::Authorization => "a new GoTo consent was stored",
        RolloutRestartTrigger::RefreshTokenRotation => "GoTo issued a new refresh token",
        RolloutRestartTrigger::AccessToken => "a new access token was stored",
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn time(ts: Timestamp) -> Time {
    Time(ts.round(jiff::Unit::Second).unwrap_or(ts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{at, tokens};

    const NOW: &str = "2026-11-23T10:00:00Z";

    fn deployment(name: &str) -> RolloutRestartTarget {
        RolloutRestartTarget {
            kind: WorkloadKind::Deployment,
            name: name.into(),
        }
    }

    fn settings(on: &[RolloutRestartTrigger]) -> RolloutSettings {
        RolloutSettings {
            targets: vec![deployment("app")],
            on: on.iter().copied().collect::<BTreeSet<_>>(),
            min_interval: Duration::from_secs(300),
        }
    }

    fn default_on() -> RolloutSettings {
        settings(&crate::validation::DEFAULT_ROLLOUT_RESTART_ON)
    }

    fn record(handled: Option<&str>, last: Option<&str>) -> RolloutRestartStatus {
        RolloutRestartStatus {
            since: time(at(NOW)),
            handled_change_time: handled.map(|h| time(at(h))),
            last_restart_time: last.map(|l| time(at(l))),
            last_restart_trigger: last.map(|_| RolloutRestartTrigger::Authorization),
            pending_restart_time: None,
            failed_targets: Vec::new(),
        }
    }

    /// What server-side apply can leave behind once the targets are removed is no record.
    #[test]
    fn an_empty_leftover_is_no_record() {
        let status: crate::resource::GoToOAuthClientStatus =
            serde_json::from_value(serde_json::json!({"rolloutRestart": {}})).unwrap();
        assert_eq!(status.rollout_restart, None);
        let written = serde_json::to_value(record(None, None)).unwrap();
        assert!(written.get("since").is_some(), "{written}");
    }

    #[test]
    fn no_targets_no_record() {
        let mut s = default_on();
        s.targets.clear();
        let t = tokens("2026-11-23T09:00:00Z", "2026-11-23T09:00:00Z", "r");
        assert_eq!(decide(&s, None, None, Some(&t), at(NOW)), Decision::Off);
    }

    /// Restarts configured on a client that already has tokens: its pods run with them.
    #[test]
    fn configuring_restarts_records_a_baseline_without_restarting() {
        let t = tokens("2026-11-23T09:30:00Z", "2026-11-20T09:00:00Z", "r");
        assert_eq!(
            decide(&default_on(), None, Some(&t), Some(&t), at(NOW)),
            Decision::UpToDate(record(Some("2026-11-20T09:00:00Z"), None))
        );
        let none = decide(&default_on(), None, None, None, at(NOW));
        assert_eq!(none, Decision::UpToDate(record(None, None)));
        assert_eq!(
            condition(&record(None, None)).reason,
            Reason::NoRestartNeeded
        );
    }

    /// The first tokens (a consent, or tokens stored in the reconcile that records the
    /// baseline) restart the targets: pods started before them had none.
    #[test]
    fn first_tokens_restart() {
        let t = tokens("2026-11-23T09:59:00Z", "2026-11-23T09:59:00Z", "r");
        assert_eq!(
            decide(
                &default_on(),
                Some(&record(None, None)),
                Some(&t),
                Some(&t),
                at(NOW)
            ),
            Decision::Restart {
                change: at("2026-11-23T09:59:00Z"),
                trigger: RolloutRestartTrigger::Authorization
            }
        );
        assert_eq!(
            decide(&default_on(), None, None, Some(&t), at(NOW)),
            Decision::Restart {
                change: at("2026-11-23T09:59:00Z"),
                trigger: RolloutRestartTrigger::Authorization
            },
            "no record and no tokens before this reconcile"
        );
    }

    /// An hourly refresh restarts nothing unless `AccessToken` is asked for; a consent counts
    /// as `Authorization` even when `AccessToken` is asked for too.
    #[test]
    fn only_the_asked_for_changes_restart() {
        let consent = "2026-11-23T08:00:00Z";
        let refreshed = tokens("2026-11-23T09:40:00Z", consent, "r");
        let handled = record(Some(consent), Some(consent));
        assert!(matches!(
            decide(
                &default_on(),
                Some(&handled),
                None,
                Some(&refreshed),
                at(NOW)
            ),
            Decision::UpToDate(_)
        ));
        let every = settings(&[
            RolloutRestartTrigger::Authorization,
            RolloutRestartTrigger::AccessToken,
        ]);
        assert_eq!(
            decide(&every, Some(&handled), None, Some(&refreshed), at(NOW)),
            Decision::Restart {
                change: at("2026-11-23T09:40:00Z"),
                trigger: RolloutRestartTrigger::AccessToken
            }
        );
        let consented = tokens(consent, consent, "r");
        assert_eq!(
            latest_change(&consented, &every.on),
            Some((at(consent), RolloutRestartTrigger::Authorization))
        );
        let only_access = settings(&[RolloutRestartTrigger::AccessToken]);
        assert_eq!(
            latest_change(&consented, &only_access.on),
            Some((at(consent), RolloutRestartTrigger::AccessToken))
        );
    }

    /// GoTo rotating the refresh token on a refresh restarts by default; the hourly access
    /// token alone does not.
    #[test]
    fn a_rotated_refresh_token_restarts() {
        let consent = "2026-11-23T08:00:00Z";
        let handled = record(Some(consent), Some(consent));
        let mut rotated = tokens("2026-11-23T09:40:00Z", consent, "r2");
        rotated.refresh_token_obtained_at = at("2026-11-23T09:40:00Z");
        assert_eq!(
            decide(&default_on(), Some(&handled), None, Some(&rotated), at(NOW)),
            Decision::Restart {
                change: at("2026-11-23T09:40:00Z"),
                trigger: RolloutRestartTrigger::RefreshTokenRotation
            }
        );
        let only_consents = settings(&[RolloutRestartTrigger::Authorization]);
        assert!(matches!(
            decide(
                &only_consents,
                Some(&handled),
                None,
                Some(&rotated),
                at(NOW)
            ),
            Decision::UpToDate(_)
        ));
    }

    /// A personal access token renewed by exchanging it again (no refresh token) is a new
    /// access token to its consumers, not a new authorization: no hourly restart by default.
    /// Its very first tokens restart the targets like a consent's.
    #[test]
    fn pat_renewals_count_as_access_tokens() {
        let first = "2026-11-23T08:00:00Z";
        let mut renewed = tokens("2026-11-23T09:40:00Z", "2026-11-23T09:40:00Z", "r");
        renewed.refresh_token = None;
        renewed.obtained_by = TokenGrant::PersonalAccessToken;
        renewed.refresh_token_obtained_at = at("2026-11-23T09:40:00Z");
        let handled = record(Some(first), Some(first));
        assert!(matches!(
            decide(&default_on(), Some(&handled), None, Some(&renewed), at(NOW)),
            Decision::UpToDate(_)
        ));
        let every = settings(&[RolloutRestartTrigger::AccessToken]);
        assert_eq!(
            decide(&every, Some(&handled), None, Some(&renewed), at(NOW)),
            Decision::Restart {
                change: at("2026-11-23T09:40:00Z"),
                trigger: RolloutRestartTrigger::AccessToken
            }
        );
        assert_eq!(
            decide(&default_on(), None, None, Some(&renewed), at(NOW)),
            Decision::Restart {
                change: at("2026-11-23T09:40:00Z"),
                trigger: RolloutRestartTrigger::Authorization
            },
            "the first tokens"
        );
    }

    /// Changes inside the minimum interval wait for its end and restart once, for the newest.
    #[test]
    fn changes_inside_the_interval_coalesce_at_its_end() {
        let last = "2026-11-23T09:58:00Z";
        let handled = record(Some(last), Some(last));
        let t = tokens("2026-11-23T09:59:30Z", "2026-11-23T09:59:30Z", "r");
        let Decision::Wait(waiting) =
            decide(&default_on(), Some(&handled), None, Some(&t), at(NOW))
        else {
            panic!("expected to wait");
        };
        assert_eq!(
            waiting.pending_restart_time,
            Some(time(at("2026-11-23T10:03:00Z")))
        );
        assert_eq!(condition(&waiting).reason, Reason::RestartPending);
        assert_eq!(wake_at(Some(&waiting)), Some(at("2026-11-23T10:03:00Z")));
        let newer = tokens("2026-11-23T10:01:00Z", "2026-11-23T10:01:00Z", "r");
        assert_eq!(
            decide(
                &default_on(),
                Some(&waiting),
                None,
                Some(&newer),
                at("2026-11-23T10:03:00Z")
            ),
            Decision::Restart {
                change: at("2026-11-23T10:01:00Z"),
                trigger: RolloutRestartTrigger::Authorization
            }
        );
    }

    #[test]
    fn results_decide_whether_the_change_is_handled() {
        let change = at("2026-11-23T09:59:00Z");
        let trigger = RolloutRestartTrigger::Authorization;
        let previous = record(Some("2026-11-01T00:00:00Z"), Some("2026-11-01T00:00:00Z"));
        let after = |results: &[(RolloutRestartTarget, Result<(), RestartProblem>)]| {
            after_restart(
                change,
                trigger,
                Some(&previous),
                results,
                Duration::from_secs(300),
                at(NOW),
            )
        };

        let done = after(&[(deployment("app"), Ok(()))]);
        assert_eq!(done.handled_change_time, Some(time(change)));
        assert_eq!(done.pending_restart_time, None);
        assert_eq!(condition(&done).reason, Reason::RolloutRestarted);
        assert!(condition(&done).message.contains("a new GoTo consent"));

        let missing = after(&[
            (deployment("app"), Ok(())),
            (deployment("gone"), Err(RestartProblem::NotFound)),
        ]);
        assert_eq!(
            missing.handled_change_time,
            Some(time(change)),
            "not retried"
        );
        assert_eq!(missing.pending_restart_time, None);
        let c = condition(&missing);
        assert_eq!(
            (c.status, c.reason),
            ("False", Reason::RestartTargetNotFound)
        );
        assert!(c.message.contains("Deployment/gone"), "{}", c.message);

        let forbidden = after(&[(deployment("app"), Err(RestartProblem::Forbidden))]);
        assert_eq!(
            forbidden.handled_change_time, previous.handled_change_time,
            "retried"
        );
        assert_eq!(
            forbidden.pending_restart_time,
            Some(time(at("2026-11-23T10:05:00Z")))
        );
        let c = condition(&forbidden);
        assert_eq!((c.status, c.reason), ("False", Reason::RestartForbidden));
        assert!(c.message.contains("RBAC"), "{}", c.message);
        // The retry waits for the interval: no storm.
        let t = tokens("2026-11-23T09:59:00Z", "2026-11-23T09:59:00Z", "r");
        assert!(matches!(
            decide(
                &default_on(),
                Some(&forbidden),
                None,
                Some(&t),
                at("2026-11-23T10:04:59Z")
            ),
            Decision::Wait(_)
        ));
        assert!(matches!(
            decide(
                &default_on(),
                Some(&forbidden),
                None,
                Some(&t),
                at("2026-11-23T10:05:00Z")
            ),
            Decision::Restart { .. }
        ));
    }

    /// A failure of a target the spec no longer lists stops being reported.
    #[test]
    fn failures_of_removed_targets_are_dropped() {
        let mut r = record(Some("2026-11-23T09:00:00Z"), Some("2026-11-23T09:00:00Z"));
        r.failed_targets.push(FailedRestartTarget {
            kind: WorkloadKind::StatefulSet,
            name: "old".into(),
            problem: RestartProblem::NotFound,
        });
        let t = tokens("2026-11-23T09:00:00Z", "2026-11-23T09:00:00Z", "r");
        let Decision::UpToDate(now) = decide(&default_on(), Some(&r), None, Some(&t), at(NOW))
        else {
            panic!("expected up to date");
        };
        assert!(now.failed_targets.is_empty());
        assert_eq!(condition(&now).reason, Reason::RolloutRestarted);
    }
}
