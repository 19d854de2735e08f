//! Condition computation: what the operator observed, turned into `Ready` and `Authorized`.
//!
//! `Ready` answers "does the Secret hold a usable access token, and will it stay usable?";
//! `Authorized` answers "is a GoTo consent on record that the operator can refresh from?".
//! The functions are pure: they take what was actually read or written and return conditions,
//! keeping `lastTransitionTime` when a condition's status did not change, so an unchanged world
//! yields an identical status and no write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const AUTHORIZED: &str = "Authorized";

/// Machine-readable condition reasons (CamelCase, stable: automation may match on them).
pub mod reason {
    /// Everything works: a valid token is stored and refreshes are on schedule.
    pub const AUTHORIZED: &str = "Authorized";
    /// No consent yet: send `status.authorizationUrl` to a GoTo admin.
    pub const AWAITING_AUTHORIZATION: &str = "AwaitingAuthorization";
    /// The spec cannot work as written.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The client-secret Secret or its key is missing.
    pub const CLIENT_SECRET_MISSING: &str = "ClientSecretMissing";
    /// The target Secret exists and belongs to someone else.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// Refreshing fails transiently; the operator retries with backoff.
    pub const REFRESH_FAILING: &str = "RefreshFailing";
    /// The refresh token was rejected, or the client changed: a new consent is needed.
    pub const REAUTHORIZATION_REQUIRED: &str = "ReauthorizationRequired";
    /// The access token expired and could not be refreshed.
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    /// The GoTo admin clicked Deny.
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// The consent or the code exchange failed; the admin can open the link again.
    pub const AUTHORIZATION_FAILED: &str = "AuthorizationFailed";
}

/// Reasons for a failed consent attempt: they stay on `Authorized` until the next attempt.
pub const CONSENT_FAILURE_REASONS: [&str; 2] =
    [reason::ACCESS_DENIED, reason::AUTHORIZATION_FAILED];

/// Where the client stands with GoTo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Consent on record, refresh token believed good.
    Authorized { principal: Option<String> },
    /// No consent yet.
    Awaiting,
    /// The last consent attempt failed (reason is one of [`CONSENT_FAILURE_REASONS`]).
    Failed {
        reason: &'static str,
        message: String,
    },
    /// A new consent is needed (refresh token rejected, or client id / endpoint changed).
    ReauthorizationRequired { message: String },
}

/// The tokens currently stored, as far as conditions care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenFacts {
    pub expires_at: Timestamp,
}

/// Everything the conditions depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// A problem that stops the operator from acting (reason, message).
    pub blocker: Option<(&'static str, String)>,
    pub tokens: Option<TokenFacts>,
    pub authorization: Authorization,
    /// The last refresh failed transiently with this message.
    pub refresh_failure: Option<String>,
}

/// A condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

fn cond(type_: &'static str, ok: bool, reason: &'static str, message: String) -> DesiredCondition {
    DesiredCondition {
        type_,
        status: if ok { "True" } else { "False" },
        reason,
        message,
    }
}

/// `Ready` and `Authorized` for an observation at time `now`.
pub fn desired_conditions(obs: &Observation, now: Timestamp) -> [DesiredCondition; 2] {
    let valid_until = obs
        .tokens
        .filter(|t| t.expires_at > now)
        .map(|t| t.expires_at);
    let until = |t: Timestamp| {
        format!(
            "the access token in the Secret is valid until {}",
            crate::secret::rfc3339(t)
        )
    };

    let ready = match (&obs.blocker, valid_until, &obs.authorization) {
        (Some((reason, message)), Some(t), _) => cond(
            READY,
            true,
            reason,
            format!("{message}; {} but will not be refreshed", until(t)),
        ),
        (Some((reason, message)), None, _) => cond(READY, false, reason, message.clone()),
        (None, valid, Authorization::ReauthorizationRequired { message }) => match valid {
            Some(t) => cond(
                READY,
                true,
                reason::REAUTHORIZATION_REQUIRED,
                format!("{message}; {}", until(t)),
            ),
            None => cond(
                READY,
                false,
                reason::REAUTHORIZATION_REQUIRED,
                message.clone(),
            ),
        },
        (None, _, _) if obs.tokens.is_none() => match &obs.authorization {
            Authorization::Failed { reason, message } => {
                cond(READY, false, reason, message.clone())
            }
            _ => cond(
                READY,
                false,
                reason::AWAITING_AUTHORIZATION,
                "waiting for a GoTo admin to open status.authorizationUrl and click Allow".into(),
            ),
        },
        (None, Some(t), _) => match &obs.refresh_failure {
            Some(failure) => cond(
                READY,
                true,
                reason::REFRESH_FAILING,
                format!("refresh failing ({failure}), retrying; {}", until(t)),
            ),
            None => cond(READY, true, reason::AUTHORIZED, until(t)),
        },
        (None, None, _) => match &obs.refresh_failure {
            Some(failure) => cond(
                READY,
                false,
                reason::REFRESH_FAILING,
                format!("the access token expired and refreshing fails ({failure}); retrying"),
            ),
            None => cond(
                READY,
                false,
                reason::TOKEN_EXPIRED,
                "the access token expired; refreshing".into(),
            ),
        },
    };

    let authorized = match &obs.authorization {
        Authorization::Authorized { principal } => cond(
            AUTHORIZED,
            true,
            reason::AUTHORIZED,
            match principal {
                Some(p) => format!("authorized by GoTo account {p}"),
                None => "authorized at GoTo".into(),
            },
        ),
        Authorization::Awaiting => cond(
            AUTHORIZED,
            false,
            reason::AWAITING_AUTHORIZATION,
            "no GoTo consent yet: send status.authorizationUrl to a GoTo admin".into(),
        ),
        Authorization::Failed { reason, message } => {
            cond(AUTHORIZED, false, reason, message.clone())
        }
        Authorization::ReauthorizationRequired { message } => cond(
            AUTHORIZED,
            false,
            reason::REAUTHORIZATION_REQUIRED,
            format!("{message}; send the new status.authorizationUrl to a GoTo admin"),
        ),
    };
    [ready, authorized]
}

/// Full `metav1.Condition`s: `lastTransitionTime` is kept from `existing` when the status is
/// unchanged, and set to `now` otherwise.
pub fn merge_conditions(
    existing: &[Condition],
    desired: &[DesiredCondition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let previous = existing.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == d.status => p.last_transition_time.clone(),
                _ => Time(now.round(jiff::Unit::Second).unwrap_or(now)),
            };
            Condition {
                type_: d.type_.to_string(),
                status: d.status.to_string(),
                reason: d.reason.to_string(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Whether a condition moved to another status or reason: the moments worth an Event.
/// The first condition of `after` (in its order: `Ready` before `Authorized`) whose status or
/// reason differs from `before`: the change an Event reports, one per write.
pub fn transition<'a>(before: &[Condition], after: &'a [Condition]) -> Option<&'a Condition> {
    after.iter().find(|c| {
        before
            .iter()
            .find(|b| b.type_ == c.type_)
            .is_none_or(|b| b.status != c.status || b.reason != c.reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn obs(
        blocker: Option<(&'static str, &str)>,
        expires: Option<&str>,
        auth: Authorization,
    ) -> Observation {
        Observation {
            blocker: blocker.map(|(r, m)| (r, m.to_string())),
            tokens: expires.map(|e| TokenFacts { expires_at: at(e) }),
            authorization: auth,
            refresh_failure: None,
        }
    }

    const NOW: &str = "2026-11-23T10:00:00Z";

    #[test]
    fn missing_client_secret_without_tokens_is_not_ready() {
        let [ready, authorized] = desired_conditions(
            &obs(
                Some((reason::CLIENT_SECRET_MISSING, "Secret creds not found")),
                None,
                Authorization::Awaiting,
            ),
            at(NOW),
        );
        assert_eq!(
            (ready.status, ready.reason),
            ("False", reason::CLIENT_SECRET_MISSING)
        );
        assert_eq!(
            (authorized.status, authorized.reason),
            ("False", reason::AWAITING_AUTHORIZATION)
        );
    }

    #[test]
    fn awaiting_authorization() {
        let [ready, _] = desired_conditions(&obs(None, None, Authorization::Awaiting), at(NOW));
        assert_eq!(
            (ready.status, ready.reason),
            ("False", reason::AWAITING_AUTHORIZATION)
        );
    }

    #[test]
    fn refresh_failing_is_ready_until_expiry() {
        let mut o = obs(
            None,
            Some("2026-11-23T10:30:00Z"),
            Authorization::Authorized { principal: None },
        );
        o.refresh_failure = Some("server_error".into());
        let [ready, authorized] = desired_conditions(&o, at(NOW));
        assert_eq!(
            (ready.status, ready.reason),
            ("True", reason::REFRESH_FAILING)
        );
        assert_eq!(authorized.status, "True");
        let [ready, _] = desired_conditions(&o, at("2026-11-23T11:00:00Z"));
        assert_eq!(
            (ready.status, ready.reason),
            ("False", reason::REFRESH_FAILING)
        );
    }

    #[test]
    fn reauthorization_keeps_ready_while_token_lives() {
        let o = obs(
            None,
            Some("2026-11-23T10:30:00Z"),
            Authorization::ReauthorizationRequired {
                message: "refresh token rejected".into(),
            },
        );
        let [ready, authorized] = desired_conditions(&o, at(NOW));
        assert_eq!(
            (ready.status, ready.reason),
            ("True", reason::REAUTHORIZATION_REQUIRED)
        );
        assert_eq!(
            (authorized.status, authorized.reason),
            ("False", reason::REAUTHORIZATION_REQUIRED)
        );
    }

    #[test]
    fn healthy_client() {
        let o = obs(
            None,
            Some("2026-11-23T11:00:00Z"),
            Authorization::Authorized {
                principal: Some("a@b".into()),
            },
        );
        let [ready, authorized] = desired_conditions(&o, at(NOW));
        assert_eq!((ready.status, ready.reason), ("True", reason::AUTHORIZED));
        assert!(authorized.message.contains("a@b"));
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let o = obs(None, None, Authorization::Awaiting);
        let first = merge_conditions(&[], &desired_conditions(&o, at(NOW)), Some(1), at(NOW));
        let later = at("2026-11-23T10:05:00Z");
        let same = merge_conditions(&first, &desired_conditions(&o, later), Some(1), later);
        assert_eq!(
            first, same,
            "an unchanged observation yields identical conditions"
        );
        let o2 = obs(
            None,
            Some("2026-11-23T11:00:00Z"),
            Authorization::Authorized { principal: None },
        );
        let moved = merge_conditions(&first, &desired_conditions(&o2, later), Some(2), later);
        assert_eq!(moved[0].last_transition_time.0, later);
        assert_eq!(moved[0].observed_generation, Some(2));
        assert_eq!(
            transition(&first, &moved).map(|c| c.type_.as_str()),
            Some(READY)
        );
        assert_eq!(transition(&first, &same), None);
    }
}
