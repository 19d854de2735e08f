//! Condition computation: what the operator observed, turned into `Ready` and `Authorized`.
//!
//! `Ready` answers "does the Secret hold a usable access token, and will it stay usable?";
//! `Authorized` answers "is a GoTo consent on record that the operator can refresh from?".
//! The functions are pure: they take what was actually read or written and return conditions,
//! keeping `lastTransitionTime` when a condition's status did not change, so an unchanged world
//! yields an identical status and no write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    resource::{AuthorizationPhase, AuthorizationReason, AuthorizationStatus},
    validation::InvalidSpec,
};

pub const READY: &str = "Ready";
pub const AUTHORIZED: &str = "Authorized";
/// Present only with `spec.rolloutRestartTargets`: whether the targets run with the current
/// tokens (restarted for the last change that asks for it, or none needed).
pub const ROLLOUT_TARGETS_UP_TO_DATE: &str = "RolloutTargetsUpToDate";

/// Machine-readable condition reasons (CamelCase, stable: automation may match on them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Everything works: a valid token is stored and refreshes are on schedule.
    Authorized,
    /// No consent yet: send `status.authorizationUrl` to a GoTo admin.
    AwaitingAuthorization,
    /// The spec cannot work as written.
    InvalidSpec,
    /// The client-secret Secret or its key is missing.
    ClientSecretMissing,
    /// The target Secret exists and belongs to someone else.
    SecretConflict,
    /// Refreshing fails transiently; the operator retries with backoff.
    RefreshFailing,
    /// The refresh token was rejected, or the client changed: a new consent is needed.
    ReauthorizationRequired,
    /// The access token expired and could not be refreshed.
    TokenExpired,
    /// The token Secret was deleted or edited; a refresh with the refresh token the operator
    /// holds restores it.
    TokenSecretLost,
    /// The GoTo admin clicked Deny.
    AccessDenied,
    /// The consent or the code exchange failed; the admin can open the link again.
    AuthorizationFailed,
    /// The consent came from another GoTo account than `spec.expectedAccount`.
    UnexpectedAccount,
    /// The rollout targets were restarted for the latest token change.
    RolloutRestarted,
    /// No token change since restarts were configured: nothing to restart.
    NoRestartNeeded,
    /// A token change waits for `spec.rolloutRestartMinInterval` to pass.
    RestartPending,
    /// A rollout target does not exist.
    RestartTargetNotFound,
    /// The operator may not patch a rollout target (RBAC).
    RestartForbidden,
    /// Patching a rollout target failed; it is retried after the minimum interval.
    RestartFailed,
    /// The `personalAccessTokenRef` Secret or its key is missing, and tokens must be obtained
    /// with it.
    PersonalAccessTokenMissing,
    /// GoTo rejected the personal access token; it is not sent again until it changes.
    PersonalAccessTokenRejected,
}

impl Reason {
    pub const ALL: [Reason; 20] = [
        Reason::Authorized,
        Reason::AwaitingAuthorization,
        Reason::InvalidSpec,
        Reason::ClientSecretMissing,
        Reason::SecretConflict,
        Reason::RefreshFailing,
        Reason::ReauthorizationRequired,
        Reason::TokenExpired,
        Reason::TokenSecretLost,
        Reason::AccessDenied,
        Reason::AuthorizationFailed,
        Reason::UnexpectedAccount,
        Reason::RolloutRestarted,
        Reason::NoRestartNeeded,
        Reason::RestartPending,
        Reason::RestartTargetNotFound,
        Reason::RestartForbidden,
        Reason::RestartFailed,
        Reason::PersonalAccessTokenMissing,
        Reason::PersonalAccessTokenRejected,
    ];

    /// The reason a written condition carries, if it is one of ours.
    pub fn parse(written: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == written)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Authorized => "Authorized",
            Reason::AwaitingAuthorization => "AwaitingAuthorization",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ClientSecretMissing => "ClientSecretMissing",
            Reason::SecretConflict => "SecretConflict",
            Reason::RefreshFailing => "RefreshFailing",
            Reason::ReauthorizationRequired => "ReauthorizationRequired",
            Reason::TokenExpired => "TokenExpired",
            Reason::TokenSecretLost => "TokenSecretLost",
            Reason::AccessDenied => "AccessDenied",
            Reason::AuthorizationFailed => "AuthorizationFailed",
            Reason::UnexpectedAccount => "UnexpectedAccount",
            Reason::RolloutRestarted => "RolloutRestarted",
            Reason::NoRestartNeeded => "NoRestartNeeded",
            Reason::RestartPending => "RestartPending",
            Reason::RestartTargetNotFound => "RestartTargetNotFound",
            Reason::RestartForbidden => "RestartForbidden",
            Reason::RestartFailed => "RestartFailed",
            Reason::PersonalAccessTokenMissing => "PersonalAccessTokenMissing",
            Reason::PersonalAccessTokenRejected => "PersonalAccessTokenRejected",
        }
    }

    /// Whether an Event about this reason is `Normal` (otherwise `Warning`).
    pub fn is_normal(self) -> bool {
        matches!(
            self,
            Reason::Authorized
                | Reason::AwaitingAuthorization
                | Reason::RolloutRestarted
                | Reason::NoRestartNeeded
                | Reason::RestartPending
        )
    }
}

/// The reasons as strings, for code that compares with a written condition (tests, tools).
pub mod reason {
    use super::Reason;
    pub const AUTHORIZED: &str = Reason::Authorized.as_str();
    pub const AWAITING_AUTHORIZATION: &str = Reason::AwaitingAuthorization.as_str();
    pub const INVALID_SPEC: &str = Reason::InvalidSpec.as_str();
    pub const CLIENT_SECRET_MISSING: &str = Reason::ClientSecretMissing.as_str();
    pub const SECRET_CONFLICT: &str = Reason::SecretConflict.as_str();
    pub const REFRESH_FAILING: &str = Reason::RefreshFailing.as_str();
    pub const REAUTHORIZATION_REQUIRED: &str = Reason::ReauthorizationRequired.as_str();
    pub const TOKEN_EXPIRED: &str = Reason::TokenExpired.as_str();
    pub const TOKEN_SECRET_LOST: &str = Reason::TokenSecretLost.as_str();
    pub const ACCESS_DENIED: &str = Reason::AccessDenied.as_str();
    pub const AUTHORIZATION_FAILED: &str = Reason::AuthorizationFailed.as_str();
    pub const UNEXPECTED_ACCOUNT: &str = Reason::UnexpectedAccount.as_str();
    pub const ROLLOUT_RESTARTED: &str = Reason::RolloutRestarted.as_str();
    pub const NO_RESTART_NEEDED: &str = Reason::NoRestartNeeded.as_str();
    pub const RESTART_PENDING: &str = Reason::RestartPending.as_str();
    pub const RESTART_TARGET_NOT_FOUND: &str = Reason::RestartTargetNotFound.as_str();
    pub const RESTART_FORBIDDEN: &str = Reason::RestartForbidden.as_str();
    pub const RESTART_FAILED: &str = Reason::RestartFailed.as_str();
    pub const PERSONAL_ACCESS_TOKEN_MISSING: &str = Reason::PersonalAccessTokenMissing.as_str();
    pub const PERSONAL_ACCESS_TOKEN_REJECTED: &str = Reason::PersonalAccessTokenRejected.as_str();
}

/// How a consent attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsentFailure {
    /// The GoTo admin clicked Deny.
    AccessDenied,
    /// Anything else: GoTo's error, the code exchange, storing the tokens.
    AuthorizationFailed,
    /// Another GoTo account than `spec.expectedAccount` consented.
    UnexpectedAccount,
}

impl ConsentFailure {
    pub fn reason(self) -> Reason {
        match self {
            ConsentFailure::AccessDenied => Reason::AccessDenied,
            ConsentFailure::AuthorizationFailed => Reason::AuthorizationFailed,
            ConsentFailure::UnexpectedAccount => Reason::UnexpectedAccount,
        }
    }
}

/// Why a new consent is needed although tokens are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reauthorization {
    /// GoTo rejected the refresh token; `error` is the token endpoint's sanitized answer.
    RefreshTokenRejected { error: Option<String> },
    /// The spec names another client id or token endpoint than the tokens were issued to.
    ClientChanged {
        issued_client_id: String,
        issued_token_url: String,
        client_id: String,
        token_url: String,
    },
}

impl Reauthorization {
    fn message(&self) -> String {
        match self {
            Reauthorization::RefreshTokenRejected { error: Some(e) } => {
                format!("GoTo rejected the refresh token ({e})")
            }
            Reauthorization::RefreshTokenRejected { error: None } => {
                "GoTo rejected the refresh token".into()
            }
            Reauthorization::ClientChanged {
                issued_client_id,
                issued_token_url,
                client_id,
                token_url,
            } => format!(
                "the stored tokens were issued to client {issued_client_id} at {issued_token_url}; the spec now names client {client_id} at {token_url}"
            ),
        }
    }
}

/// Where the client stands with GoTo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Consent on record, refresh token believed good.
    Authorized { principal: Option<String> },
    /// No consent yet.
    Awaiting,
    /// The last consent attempt failed and no tokens are stored.
    ConsentFailed {
        failure: ConsentFailure,
        message: String,
    },
    /// A new consent is needed.
    ReauthorizationRequired(Reauthorization),
}

impl Authorization {
    /// The machine-readable form written to `status.authorization`.
    pub fn to_status(&self) -> AuthorizationStatus {
        let (phase, reason, message) = match self {
            Authorization::Authorized { .. } => (AuthorizationPhase::Authorized, None, None),
            Authorization::Awaiting => (AuthorizationPhase::AwaitingAuthorization, None, None),
            Authorization::ConsentFailed { failure, message } => (
                AuthorizationPhase::ConsentFailed,
                Some(match failure {
                    ConsentFailure::AccessDenied => AuthorizationReason::AccessDenied,
                    ConsentFailure::AuthorizationFailed => AuthorizationReason::AuthorizationFailed,
                    ConsentFailure::UnexpectedAccount => AuthorizationReason::UnexpectedAccount,
                }),
                Some(message.clone()),
            ),
            Authorization::ReauthorizationRequired(why) => (
                AuthorizationPhase::ReauthorizationRequired,
                Some(match why {
                    Reauthorization::RefreshTokenRejected { .. } => {
                        AuthorizationReason::RefreshTokenRejected
                    }
                    Reauthorization::ClientChanged { .. } => AuthorizationReason::ClientChanged,
                }),
                Some(why.message()),
            ),
        };
        AuthorizationStatus {
            phase,
            reason,
            message,
        }
    }

    /// The consent failure a status records, if any (it stands until tokens are stored).
    pub fn consent_failure(status: Option<&AuthorizationStatus>) -> Option<Authorization> {
        let status = status.filter(|s| s.phase == AuthorizationPhase::ConsentFailed)?;
        let failure = match status.reason {
            Some(AuthorizationReason::AccessDenied) => ConsentFailure::AccessDenied,
            Some(AuthorizationReason::UnexpectedAccount) => ConsentFailure::UnexpectedAccount,
            _ => ConsentFailure::AuthorizationFailed,
        };
        Some(Authorization::ConsentFailed {
            failure,
            message: status.message.clone().unwrap_or_default(),
        })
    }

    /// The rejection a status records, with the token endpoint's error when it was recorded.
    pub fn recorded_rejection(status: Option<&AuthorizationStatus>) -> Reauthorization {
        let error = status
            .filter(|s| s.reason == Some(AuthorizationReason::RefreshTokenRejected))
            .and_then(|s| s.message.as_deref())
            .and_then(|m| m.strip_prefix("GoTo rejected the refresh token ("))
            .and_then(|m| m.strip_suffix(')'))
            .map(str::to_string);
        Reauthorization::RefreshTokenRejected { error }
    }

    pub fn is_authorized(&self) -> bool {
        matches!(self, Authorization::Authorized { .. })
    }
}

/// Why the client secret cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientSecretProblem {
    #[error("Secret {namespace}/{name} (spec.clientSecretRef.name) not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no non-empty key {key:?} (spec.clientSecretRef.key)")]
    KeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
}

/// Why the personal access token cannot be used. The PAT itself is never part of it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersonalAccessTokenProblem {
    #[error("Secret {namespace}/{name} (spec.personalAccessTokenRef.name) not found")]
    SecretNotFound { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name} has no non-empty key {key:?} (spec.personalAccessTokenRef.key)"
    )]
    KeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
}

/// A problem that stops the operator from acting for a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocker {
    InvalidSpec(InvalidSpec),
    ClientSecretMissing(ClientSecretProblem),
    /// The target Secret exists and is not owned by this client.
    SecretConflict {
        namespace: String,
        name: String,
    },
    /// Tokens must be obtained with the personal access token, and it cannot be read.
    PersonalAccessTokenMissing(PersonalAccessTokenProblem),
    /// Tokens must be obtained with the personal access token, and GoTo rejected it;
    /// `error` is the token endpoint's sanitized answer.
    PersonalAccessTokenRejected {
        error: String,
    },
}

impl Blocker {
    pub fn reason(&self) -> Reason {
        match self {
            Blocker::InvalidSpec(_) => Reason::InvalidSpec,
            Blocker::ClientSecretMissing(_) => Reason::ClientSecretMissing,
            Blocker::SecretConflict { .. } => Reason::SecretConflict,
            Blocker::PersonalAccessTokenMissing(_) => Reason::PersonalAccessTokenMissing,
            Blocker::PersonalAccessTokenRejected { .. } => Reason::PersonalAccessTokenRejected,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Blocker::InvalidSpec(e) => e.to_string(),
            Blocker::ClientSecretMissing(e) => e.to_string(),
            Blocker::SecretConflict { namespace, name } => format!(
                "Secret {namespace}/{name} exists and is not owned by this GoToOAuthClient; delete it or choose another spec.secretName"
            ),
            Blocker::PersonalAccessTokenMissing(e) => format!(
                "{e}: store the personal access token there, or send status.authorizationUrl to a GoTo admin"
            ),
            Blocker::PersonalAccessTokenRejected { error } => format!(
                "GoTo rejected the personal access token ({error}); it is not sent again until its Secret or the spec changes: store a valid one, or send status.authorizationUrl to a GoTo admin"
            ),
        }
    }

    /// Whether the authorization link is withdrawn while this blocks: it is when a consent
    /// could not work either (the spec, the client secret, the token Secret). A personal access
    /// token problem leaves the consent as the other way to obtain tokens.
    pub fn withdraws_link(&self) -> bool {
        !matches!(
            self,
            Blocker::PersonalAccessTokenMissing(_) | Blocker::PersonalAccessTokenRejected { .. }
        )
    }
}

/// The tokens currently stored, as far as conditions care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenFacts {
    pub expires_at: Timestamp,
}

/// Everything the conditions depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// A problem that stops the operator from acting.
    pub blocker: Option<Blocker>,
    pub tokens: Option<TokenFacts>,
    pub authorization: Authorization,
    /// The last refresh failed transiently with this message.
    pub refresh_failure: Option<String>,
    /// The token Secret no longer holds `tokens` (deleted or edited), and the refresh that
    /// restores it has not succeeded yet.
    pub secret_lost: bool,
}

/// A condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: Reason,
    pub message: String,
}

pub(crate) fn cond(
    type_: &'static str,
    ok: bool,
    reason: Reason,
    message: String,
) -> DesiredCondition {
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
        (Some(blocker), Some(t), _) => cond(
            READY,
            true,
            blocker.reason(),
            format!(
                "{}; {} but will not be refreshed",
                blocker.message(),
                until(t)
            ),
        ),
        (Some(blocker), None, _) => cond(READY, false, blocker.reason(), blocker.message()),
        (None, valid, Authorization::ReauthorizationRequired(why)) => match valid {
            Some(t) => cond(
                READY,
                true,
                Reason::ReauthorizationRequired,
                format!("{}; {}", why.message(), until(t)),
            ),
            None => cond(READY, false, Reason::ReauthorizationRequired, why.message()),
        },
        (None, _, _) if obs.tokens.is_none() => match &obs.authorization {
            Authorization::ConsentFailed { failure, message } => {
                cond(READY, false, failure.reason(), message.clone())
            }
            // Only a personal access token exchange fails without tokens on the controller's side.
            _ if obs.refresh_failure.is_some() => cond(
                READY,
                false,
                Reason::RefreshFailing,
                format!(
                    "obtaining tokens with the personal access token fails ({}); retrying",
                    obs.refresh_failure.as_deref().unwrap_or_default()
                ),
            ),
            _ => cond(
                READY,
                false,
                Reason::AwaitingAuthorization,
                "waiting for a GoTo admin to open status.authorizationUrl and click Allow".into(),
            ),
        },
        (None, Some(_), _) if obs.secret_lost => cond(
            READY,
            false,
            Reason::TokenSecretLost,
            match &obs.refresh_failure {
                Some(failure) => format!(
                    "the token Secret was deleted or edited; restoring it with a refresh fails ({failure}); retrying"
                ),
                None => {
                    "the token Secret was deleted or edited; restoring it with a refresh".into()
                }
            },
        ),
        (None, Some(t), _) => match &obs.refresh_failure {
            Some(failure) => cond(
                READY,
                true,
                Reason::RefreshFailing,
                format!("refresh failing ({failure}), retrying; {}", until(t)),
            ),
            None => cond(READY, true, Reason::Authorized, until(t)),
        },
        (None, None, _) => match &obs.refresh_failure {
            Some(failure) => cond(
                READY,
                false,
                Reason::RefreshFailing,
                format!("the access token expired and refreshing fails ({failure}); retrying"),
            ),
            None => cond(
                READY,
                false,
                Reason::TokenExpired,
                "the access token expired; refreshing".into(),
            ),
        },
    };

    let authorized = match &obs.authorization {
        Authorization::Authorized { principal } => cond(
            AUTHORIZED,
            true,
            Reason::Authorized,
            match principal {
                Some(p) => format!("authorized by GoTo account {p}"),
                None => "authorized at GoTo".into(),
            },
        ),
        // No tokens yet, and the personal access token cannot give them: say why.
        Authorization::Awaiting => match obs.blocker.as_ref().filter(|b| !b.withdraws_link()) {
            Some(blocker) => cond(AUTHORIZED, false, blocker.reason(), blocker.message()),
            None => cond(
                AUTHORIZED,
                false,
                Reason::AwaitingAuthorization,
                "no GoTo consent yet: send status.authorizationUrl to a GoTo admin".into(),
            ),
        },
        Authorization::ConsentFailed { failure, message } => {
            cond(AUTHORIZED, false, failure.reason(), message.clone())
        }
        Authorization::ReauthorizationRequired(why) => cond(
            AUTHORIZED,
            false,
            Reason::ReauthorizationRequired,
            format!(
                "{}; send the new status.authorizationUrl to a GoTo admin",
                why.message()
            ),
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
                reason: d.reason.as_str().to_string(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// The conditions that moved to another status or reason: the moments worth an Event. Of
/// `Ready` and `Authorized`, only the first that changed (they often change together, for one
/// cause); the rollout condition on its own, when it turned to a problem (a restart reports
/// itself).
pub fn transitions<'a>(before: &[Condition], after: &'a [Condition]) -> Vec<&'a Condition> {
    let changed = |c: &&Condition| {
        before
            .iter()
            .find(|b| b.type_ == c.type_)
            .is_none_or(|b| b.status != c.status || b.reason != c.reason)
    };
    let token = after
        .iter()
        .filter(|c| c.type_ != ROLLOUT_TARGETS_UP_TO_DATE)
        .find(changed);
    let rollout = after
        .iter()
        .filter(|c| c.type_ == ROLLOUT_TARGETS_UP_TO_DATE)
        .filter(|c| Reason::parse(&c.reason).is_some_and(|r| !r.is_normal()))
        .find(changed);
    token.into_iter().chain(rollout).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn obs(blocker: Option<Blocker>, expires: Option<&str>, auth: Authorization) -> Observation {
        Observation {
            blocker,
            tokens: expires.map(|e| TokenFacts { expires_at: at(e) }),
            authorization: auth,
            refresh_failure: None,
            secret_lost: false,
        }
    }

    const NOW: &str = "2026-11-23T10:00:00Z";

    #[test]
    fn missing_client_secret_without_tokens_is_not_ready() {
        let [ready, authorized] = desired_conditions(
            &obs(
                Some(Blocker::ClientSecretMissing(
                    ClientSecretProblem::SecretNotFound {
                        namespace: "ns".into(),
                        name: "creds".into(),
                    },
                )),
                None,
                Authorization::Awaiting,
            ),
            at(NOW),
        );
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("False", reason::CLIENT_SECRET_MISSING)
        );
        assert_eq!(
            (authorized.status, authorized.reason.as_str()),
            ("False", reason::AWAITING_AUTHORIZATION)
        );
    }

    #[test]
    fn personal_access_token_problems_name_themselves_and_keep_the_link() {
        let rejected = Blocker::PersonalAccessTokenRejected {
            error: "GoTo rejected the grant (invalid_grant)".into(),
        };
        assert!(!rejected.withdraws_link());
        let [ready, authorized] = desired_conditions(
            &obs(Some(rejected.clone()), None, Authorization::Awaiting),
            at(NOW),
        );
        for c in [&ready, &authorized] {
            assert_eq!(
                (c.status, c.reason.as_str()),
                ("False", reason::PERSONAL_ACCESS_TOKEN_REJECTED)
            );
            assert!(c.message.contains("invalid_grant"), "{}", c.message);
        }
        let missing = Blocker::PersonalAccessTokenMissing(PersonalAccessTokenProblem::KeyMissing {
            namespace: "ns".into(),
            name: "pat".into(),
            key: "personalAccessToken".into(),
        });
        let [ready, _] =
            desired_conditions(&obs(Some(missing), None, Authorization::Awaiting), at(NOW));
        assert_eq!(ready.reason.as_str(), reason::PERSONAL_ACCESS_TOKEN_MISSING);
        assert!(ready.message.contains("spec.personalAccessTokenRef.key"));
        // A failing exchange without tokens is not a wait for a consent.
        let mut failing = obs(None, None, Authorization::Awaiting);
        failing.refresh_failure = Some("GoTo token endpoint failed (HTTP 503)".into());
        let [ready, _] = desired_conditions(&failing, at(NOW));
        assert_eq!(ready.reason.as_str(), reason::REFRESH_FAILING);
    }

    #[test]
    fn awaiting_authorization() {
        let [ready, _] = desired_conditions(&obs(None, None, Authorization::Awaiting), at(NOW));
        assert_eq!(
            (ready.status, ready.reason.as_str()),
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
            (ready.status, ready.reason.as_str()),
            ("True", reason::REFRESH_FAILING)
        );
        assert_eq!(authorized.status, "True");
        let [ready, _] = desired_conditions(&o, at("2026-11-23T11:00:00Z"));
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("False", reason::REFRESH_FAILING)
        );
    }

    #[test]
    fn a_lost_token_secret_is_not_ready_until_restored() {
        let mut o = obs(
            None,
            Some("2026-11-23T10:30:00Z"),
            Authorization::Authorized { principal: None },
        );
        o.secret_lost = true;
        let [ready, authorized] = desired_conditions(&o, at(NOW));
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("False", reason::TOKEN_SECRET_LOST)
        );
        assert!(!ready.message.contains("valid until"), "{}", ready.message);
        assert_eq!(authorized.status, "True", "the consent stands");
        o.refresh_failure = Some("GoTo token endpoint failed (HTTP 503)".into());
        let [ready, _] = desired_conditions(&o, at(NOW));
        assert_eq!(ready.reason.as_str(), reason::TOKEN_SECRET_LOST);
        assert!(ready.message.contains("HTTP 503"), "{}", ready.message);
        // A blocker (nothing can be restored) says so first.
        o.blocker = Some(Blocker::ClientSecretMissing(
            ClientSecretProblem::SecretNotFound {
                namespace: "ns".into(),
                name: "creds".into(),
            },
        ));
        let [ready, _] = desired_conditions(&o, at(NOW));
        assert_eq!(ready.reason.as_str(), reason::CLIENT_SECRET_MISSING);
    }

    #[test]
    fn reauthorization_keeps_ready_while_token_lives() {
        let o = obs(
            None,
            Some("2026-11-23T10:30:00Z"),
            Authorization::ReauthorizationRequired(Reauthorization::RefreshTokenRejected {
                error: None,
            }),
        );
        let [ready, authorized] = desired_conditions(&o, at(NOW));
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("True", reason::REAUTHORIZATION_REQUIRED)
        );
        assert_eq!(
            (authorized.status, authorized.reason.as_str()),
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
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("True", reason::AUTHORIZED)
        );
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
        let types = |v: Vec<&Condition>| v.iter().map(|c| c.type_.clone()).collect::<Vec<_>>();
        assert_eq!(types(transitions(&first, &moved)), [READY]);
        assert!(transitions(&first, &same).is_empty());
    }

    /// The rollout condition reports its problems on its own, beside a token change, and
    /// stays silent when it turns good (the restart has its own Event).
    #[test]
    fn rollout_problems_are_reported_beside_token_transitions() {
        let rollout = |ok, reason| cond(ROLLOUT_TARGETS_UP_TO_DATE, ok, reason, String::new());
        let o = obs(None, None, Authorization::Awaiting);
        let mut first = desired_conditions(&o, at(NOW)).to_vec();
        first.push(rollout(true, Reason::NoRestartNeeded));
        let first = merge_conditions(&[], &first, Some(1), at(NOW));
        let o2 = obs(
            None,
            Some("2026-11-23T11:00:00Z"),
            Authorization::Authorized { principal: None },
        );
        let with = |r: DesiredCondition| {
            let mut d = desired_conditions(&o2, at(NOW)).to_vec();
            d.push(r);
            merge_conditions(&first, &d, Some(1), at(NOW))
        };
        let types = |v: Vec<&Condition>| v.iter().map(|c| c.reason.clone()).collect::<Vec<_>>();
        assert_eq!(
            types(transitions(
                &first,
                &with(rollout(false, Reason::RestartForbidden))
            )),
            ["Authorized", "RestartForbidden"]
        );
        assert_eq!(
            types(transitions(
                &first,
                &with(rollout(true, Reason::RolloutRestarted))
            )),
            ["Authorized"]
        );
    }
}
