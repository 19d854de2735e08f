//! What the client subcommands print and decide, from a GoToOAuthClient alone: pure functions,
//! unit-tested without a cluster. They read only the resource (never a Secret), so nothing they
//! print can be a token or a client secret; the authorization link is shown only when a consent
//! is needed, since it is a bearer credential.

use std::{fmt::Write as _, time::Duration};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    conditions::{AUTHORIZED, READY, ROLLOUT_TARGETS_UP_TO_DATE, Reason},
    resource::{AuthorizationPhase, GoToOAuthClient, TokenGrant},
};

/// What `status` prints, and whether the client is Ready (the exit code).
pub(crate) struct Summary {
    pub(crate) text: String,
    pub(crate) ready: bool,
}

/// The human summary of a client at `now`.
pub(crate) fn render(obj: &GoToOAuthClient, now: Timestamp) -> Summary {
    let status = obj.status.clone().unwrap_or_default();
    let ready = obj.condition(READY);
    let mut text = format!("GoToOAuthClient {}\n", qualified_name(obj));
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(text, "{:<15}{value}", format!("{label}:"));
    };
    if obj
        .spec
        .display_name
        .as_deref()
        .is_some_and(|d| !d.trim().is_empty())
    {
        // From the spec: control characters are dropped so it cannot drive the terminal.
        let name: String = obj
            .display_name()
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        line("Display name", &name);
    }
    line("Ready", &describe(ready));
    line("Authorized", &describe(obj.condition(AUTHORIZED)));
    if let (Some(seen), Some(generation)) = (status.observed_generation, obj.metadata.generation)
        && seen < generation
    {
        line(
            "Note",
            &format!(
                "the status describes generation {seen}; the operator has not processed the latest spec change (generation {generation}) yet"
            ),
        );
    }
    let account = match (&status.principal, &status.account_key) {
        (Some(p), Some(key)) => format!("{p} (account key {key})"),
        (Some(p), None) => p.clone(),
        (None, Some(key)) => format!("account key {key}"),
        (None, None) => "none yet".into(),
    };
    line("Account", &account);
    if let Some(grant) = status.obtained_by {
        line(
            "Obtained by",
            match grant {
                TokenGrant::AuthorizationCode => "a GoTo admin's consent (authorization code)",
                TokenGrant::PersonalAccessToken => {
                    "the personal access token of spec.personalAccessTokenRef"
                }
            },
        );
    }
    let time = |t: &Option<Time>, none: &str| t.as_ref().map_or(none.to_string(), |t| when(t, now));
    line(
        "Token expires",
        &time(&status.access_token_expires_at, "no token stored"),
    );
    if status.last_refresh_time.is_some() {
        line("Last refresh", &time(&status.last_refresh_time, ""));
    }
    if status.refresh_token_obtained_at.is_some() {
        line(
            "Refresh token",
            &format!(
                "issued {}; GoTo's refresh tokens last about 30 days",
                time(&status.refresh_token_obtained_at, "")
            ),
        );
    }
    line(
        "Next refresh",
        &time(&status.next_refresh_time, "none scheduled"),
    );
    if let Some(secret) = &status.secret_name {
        line("Secret", secret);
    }
    if let Some(restarts) = obj.condition(ROLLOUT_TARGETS_UP_TO_DATE) {
        line("Restarts", &describe(Some(restarts)));
    }
    if needs_consent(obj)
        && let Some(link) = &status.authorization_url
    {
        line("Link", link);
    }
    line("What to do", &advice(ready));
    Summary {
        text,
        ready: ready.is_some_and(|c| c.status == "True"),
    }
}

/// The link for a GoTo admin, or why the client publishes none.
pub(crate) fn link(obj: &GoToOAuthClient) -> Result<String, String> {
    match obj
        .status
        .as_ref()
        .and_then(|s| s.authorization_url.clone())
    {
        Some(link) => Ok(link),
        None => Err(format!(
            "{} publishes no authorization link: {}",
            qualified_name(obj),
            describe(obj.condition(READY))
        )),
    }
}

/// Why a refresh cannot be asked for, if it cannot: the operator refreshes only clients with a
/// consent on record.
pub(crate) fn refresh_blocker(obj: &GoToOAuthClient) -> Option<String> {
    let authorized = obj
        .condition(AUTHORIZED)
        .is_some_and(|c| c.status == "True");
    (!authorized).then(|| {
        format!(
            "{} cannot be refreshed: it is not authorized ({}). What to do: {}",
            qualified_name(obj),
            describe(obj.condition(AUTHORIZED)),
            advice(obj.condition(READY))
        )
    })
}

/// What `refresh --wait` concludes from the client as it is now: `None` while the operator has
/// not answered the request `requested` yet, `Ok` once it refreshed, `Err` (why) once it failed.
/// `before` is the client as it was before the request.
pub(crate) fn refresh_outcome(
    obj: &GoToOAuthClient,
    requested: &str,
    before: &GoToOAuthClient,
) -> Option<Result<String, String>> {
    let status = obj.status.clone().unwrap_or_default();
    let handled = status.handled_refresh_request.as_deref() == Some(requested);
    let ready = obj.condition(READY);
    let failed = || {
        Err(format!(
            "the refresh of {} failed: {}. What to do: {}",
            qualified_name(obj),
            describe(ready),
            advice(ready)
        ))
    };
    // The operator answers a request only with new tokens, or when GoTo rejected the refresh
    // token (then the client needs a new consent). `lastRefreshTime` has whole seconds, so the
    // phase tells the two apart even for a refresh within the second of the previous one.
    let authorized = status
        .authorization
        .as_ref()
        .is_some_and(|a| a.phase == AuthorizationPhase::Authorized);
    if handled && authorized {
        let expiry = status
            .access_token_expires_at
            .map_or_else(|| "unknown".into(), |t| t.0.to_string());
        return Some(Ok(format!(
            "refreshed {} at {}; the access token expires at {expiry}\n",
            qualified_name(obj),
            status
                .last_refresh_time
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        )));
    }
    if handled {
        return Some(failed());
    }
    let changed = !same_condition(ready, before.condition(READY));
    let healthy = ready.is_some_and(|c| c.reason == Reason::Authorized.as_str());
    (changed && !healthy).then(failed)
}

/// Whether a GoTo admin's consent is needed now (only then is the link worth showing).
fn needs_consent(obj: &GoToOAuthClient) -> bool {
    let phase = obj
        .status
        .as_ref()
        .and_then(|s| s.authorization.as_ref())
        .map(|a| a.phase);
    phase.is_some_and(|p| p != AuthorizationPhase::Authorized)
        || obj
            .condition(READY)
            .and_then(|c| Reason::parse(&c.reason))
            .is_some_and(|r| {
                matches!(
                    r,
                    Reason::AwaitingAuthorization
                        | Reason::ReauthorizationRequired
                        | Reason::AccessDenied
                        | Reason::AuthorizationFailed
                        | Reason::UnexpectedAccount
                        | Reason::PersonalAccessTokenMissing
                        | Reason::PersonalAccessTokenRejected
                )
            })
}

fn same_condition(a: Option<&Condition>, b: Option<&Condition>) -> bool {
    let key =
        |c: Option<&Condition>| c.map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    key(a) == key(b)
}

fn qualified_name(obj: &GoToOAuthClient) -> String {
    format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or_default(),
        obj.metadata.name.as_deref().unwrap_or_default()
    )
}

/// `True, Authorized: message`, or that the operator has not reported yet.
fn describe(condition: Option<&Condition>) -> String {
    match condition {
        Some(c) => format!("{}, {}: {}", c.status, c.reason, c.message),
        None => "unknown: the operator has not reported on this client yet (is it running and watching this namespace?)".into(),
    }
}

/// The README's "what to do" for the Ready condition's reason, worded for a terminal.
fn advice(ready: Option<&Condition>) -> String {
    match ready.map(|c| Reason::parse(&c.reason)) {
        Some(Some(reason)) => what_to_do(reason)
            .replace("`status.authorizationUrl`", "the link above")
            .replace("**", ""),
        Some(None) => "Read the message above and the operator's log.".into(),
        None => {
            "Check that the operator runs and watches this namespace (its log says which).".into()
        }
    }
}

/// The "what to do" column of the README's "Condition reasons" table (a test keeps them equal).
fn what_to_do(reason: Reason) -> &'static str {
    match reason {
        Reason::Authorized => "Nothing.",
        Reason::AwaitingAuthorization => "Send `status.authorizationUrl` to a GoTo admin.",
        Reason::InvalidSpec => {
            "Fix the spec. For an endpoint host that is not allowed, use GoTo's or ask the operator's admin to list it in `--allowed-endpoint-hosts`."
        }
        Reason::ClientSecretMissing => "Create the Secret (step 2).",
        Reason::SecretConflict => "Delete or rename that Secret, or choose another `secretName`.",
        Reason::RefreshFailing => {
            "Usually nothing. If it persists, check network egress to GoTo and the operator log."
        }
        Reason::ReauthorizationRequired => {
            "Send the new `status.authorizationUrl` to a GoTo admin."
        }
        Reason::TokenExpired => {
            "As for `RefreshFailing`. Workloads have no valid token until it recovers."
        }
        Reason::TokenSecretLost => {
            "Usually nothing. If it persists, as for `RefreshFailing`; pods cannot mount the Secret until it is back."
        }
        Reason::AccessDenied => "Ask them to open the link again and click **Allow**.",
        Reason::UnexpectedAccount => {
            "Sign in to GoTo with the expected account and open the link again."
        }
        Reason::AuthorizationFailed => "Fix the cause, then open the link again.",
        Reason::RolloutRestarted | Reason::NoRestartNeeded => "Nothing.",
        Reason::RestartPending => {
            "Nothing; the targets restart when `rolloutRestartMinInterval` has passed."
        }
        Reason::RestartTargetNotFound => {
            "Fix the name in `rolloutRestartTargets` or create the workload."
        }
        Reason::RestartForbidden => {
            "Grant the operator `patch` on the workload (chart value `rolloutRestart.enabled`, or `deploy/examples/rollout-restart-rbac.yaml`)."
        }
        Reason::RestartFailed => {
            "Usually nothing: it is retried. If it persists, read the message and the operator log."
        }
        Reason::PersonalAccessTokenMissing => {
            "Store the personal access token in the `personalAccessTokenRef` Secret and key, or send `status.authorizationUrl` to a GoTo admin."
        }
        Reason::PersonalAccessTokenRejected => {
            "Create a new personal access token at GoTo and store it in the `personalAccessTokenRef` Secret (the operator tries again when it changes), or send `status.authorizationUrl` to a GoTo admin."
        }
    }
}

/// `2026-01-01T10:00:00Z (in 42m)`.
fn when(t: &Time, now: Timestamp) -> String {
    let secs = t.0.duration_since(now).as_secs();
    let span = humantime::format_duration(Duration::from_secs(secs.unsigned_abs()));
    if secs >= 0 {
        format!("{} (in {span})", t.0)
    } else {
        format!("{} ({span} ago)", t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{AuthorizationStatus, GoToOAuthClientStatus};

    fn condition(type_: &str, status: bool, reason: Reason, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.as_str().into(),
            message: message.into(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    fn client(status: Option<GoToOAuthClientStatus>) -> GoToOAuthClient {
        let mut obj: GoToOAuthClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "goto-oauth.dev/v1alpha1",
            "kind": "GoToOAuthClient",
            "metadata": {"name": "demo", "namespace": "ns", "generation": 1},
            "spec": {"clientId": "id", "clientSecretRef": {"name": "creds"}},
        }))
        .unwrap();
        obj.status = status;
        obj
    }

    fn assert_lines(text: &str, needles: &[&str]) {
        for needle in needles {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn awaiting() -> GoToOAuthClient {
        client(Some(GoToOAuthClientStatus {
            conditions: vec![
                condition(READY, false, Reason::AwaitingAuthorization, "waiting"),
                condition(
                    AUTHORIZED,
                    false,
                    Reason::AwaitingAuthorization,
                    "no consent",
                ),
            ],
            authorization_url: Some("https://op.example/authorize/ns/demo/abc".into()),
            authorization: Some(AuthorizationStatus {
                phase: AuthorizationPhase::AwaitingAuthorization,
                reason: None,
                message: None,
            }),
            ..Default::default()
        }))
    }

    fn authorized(last_refresh: i64) -> GoToOAuthClient {
        client(Some(GoToOAuthClientStatus {
            conditions: vec![
                condition(READY, true, Reason::Authorized, "valid"),
                condition(AUTHORIZED, true, Reason::Authorized, "by alice"),
            ],
            authorization_url: Some("https://op.example/authorize/ns/demo/next".into()),
            authorization: Some(AuthorizationStatus {
                phase: AuthorizationPhase::Authorized,
                reason: None,
                message: None,
            }),
            principal: Some("alice@example.com".into()),
            access_token_expires_at: Some(at(last_refresh + 3600)),
            last_refresh_time: Some(at(last_refresh)),
            next_refresh_time: Some(at(last_refresh + 2400)),
            secret_name: Some("demo-token".into()),
            ..Default::default()
        }))
    }

    #[test]
    fn awaiting_client_shows_the_link_and_what_to_do() {
        let s = render(&awaiting(), Timestamp::UNIX_EPOCH);
        assert!(!s.ready);
        assert_lines(
            &s.text,
            &[
                "GoToOAuthClient ns/demo",
                "Link:          https://op.example/authorize/ns/demo/abc",
                "Send the link above to a GoTo admin.",
                "Account:       none yet",
            ],
        );
        assert_eq!(
            link(&awaiting()).unwrap(),
            "https://op.example/authorize/ns/demo/abc"
        );
        assert!(
            refresh_blocker(&awaiting())
                .unwrap()
                .contains("not authorized")
        );
    }

    #[test]
    fn authorized_client_shows_account_and_times_but_not_the_link() {
        let now = Timestamp::from_second(1_000).unwrap();
        let s = render(&authorized(400), now);
        assert!(s.ready);
        assert_lines(
            &s.text,
            &[
                "Ready:         True, Authorized: valid",
                "Account:       alice@example.com",
                "(in 50m)",
                "(10m ago)",
                "(in 30m)",
                "Secret:        demo-token",
                "What to do:    Nothing.",
            ],
        );
        assert!(!s.text.contains("authorize/ns/demo/next"), "{}", s.text);
        assert!(!s.text.contains("Restarts:"), "no targets, no line");
        assert!(refresh_blocker(&authorized(400)).is_none());
    }

    /// With restart targets, where they stand is one more line.
    #[test]
    fn restart_targets_are_summarized() {
        let mut obj = authorized(400);
        obj.status.as_mut().unwrap().conditions.push(condition(
            ROLLOUT_TARGETS_UP_TO_DATE,
            false,
            Reason::RestartForbidden,
            "Deployment/app: forbidden",
        ));
        let s = render(&obj, Timestamp::from_second(1_000).unwrap());
        assert_lines(
            &s.text,
            &["Restarts:      False, RestartForbidden: Deployment/app: forbidden"],
        );
        assert!(s.ready, "restarts do not decide Ready");
    }

    #[test]
    fn display_name_and_refresh_token_age_are_shown() {
        let now = Timestamp::from_second(1_000).unwrap();
        let mut obj = authorized(400);
        assert!(!render(&obj, now).text.contains("Display name"));
        obj.spec.display_name = Some("Payroll\u{1b}[31m sync".into());
        obj.status.as_mut().unwrap().refresh_token_obtained_at =
            Some(Time(Timestamp::from_second(400).unwrap()));
        let s = render(&obj, now);
        assert_lines(
            &s.text,
            &["Display name:  Payroll[31m sync", "Refresh token: issued "],
        );
        assert!(!s.text.contains('\u{1b}'));
    }

    #[test]
    fn unreported_and_linkless_clients_say_why() {
        let s = render(&client(None), Timestamp::UNIX_EPOCH);
        assert!(!s.ready);
        assert!(s.text.contains("has not reported"), "{}", s.text);
        let mut invalid = awaiting();
        let status = invalid.status.as_mut().unwrap();
        status.authorization_url = None;
        status.conditions[0] = condition(
            READY,
            false,
            Reason::InvalidSpec,
            "spec.redirectUri uses http",
        );
        let why = link(&invalid).unwrap_err();
        assert!(
            why.contains("InvalidSpec: spec.redirectUri uses http"),
            "{why}"
        );
    }

    #[test]
    fn refresh_outcome_waits_then_succeeds_or_fails() {
        let before = authorized(400);
        assert_eq!(refresh_outcome(&before, "r1", &before), None);
        let mut done = authorized(900);
        done.status.as_mut().unwrap().handled_refresh_request = Some("r1".into());
        assert!(
            refresh_outcome(&done, "r1", &before)
                .unwrap()
                .unwrap()
                .contains("refreshed ns/demo")
        );
        // Handled without new tokens: rejected.
        let mut rejected = authorized(400);
        let status = rejected.status.as_mut().unwrap();
        status.handled_refresh_request = Some("r1".into());
        status.conditions[0] = condition(READY, true, Reason::ReauthorizationRequired, "rejected");
        status.authorization = Some(AuthorizationStatus {
            phase: AuthorizationPhase::ReauthorizationRequired,
            reason: None,
            message: None,
        });
        let why = refresh_outcome(&rejected, "r1", &before)
            .unwrap()
            .unwrap_err();
        assert!(why.contains("ReauthorizationRequired: rejected"), "{why}");
        // A transient failure after the request.
        let mut failing = authorized(400);
        failing.status.as_mut().unwrap().conditions[0] =
            condition(READY, true, Reason::RefreshFailing, "GoTo answered 503");
        let why = refresh_outcome(&failing, "r1", &before)
            .unwrap()
            .unwrap_err();
        assert!(why.contains("RefreshFailing: GoTo answered 503"), "{why}");
        // The same failure as before the request is not this request's answer yet.
        assert_eq!(refresh_outcome(&failing, "r1", &failing), None);
    }

    #[test]
    fn personal_access_token_clients_say_how_and_what_to_do() {
        let obtained = client(Some(GoToOAuthClientStatus {
            conditions: vec![
                condition(READY, true, Reason::Authorized, "valid"),
                condition(AUTHORIZED, true, Reason::Authorized, "authorized"),
            ],
            obtained_by: Some(TokenGrant::PersonalAccessToken),
            ..Default::default()
        }));
        let text = render(&obtained, Timestamp::UNIX_EPOCH).text;
        assert_lines(
            &text,
            &["Obtained by:   the personal access token of spec.personalAccessTokenRef"],
        );
        let rejected = client(Some(GoToOAuthClientStatus {
            conditions: vec![
                condition(
                    READY,
                    false,
                    Reason::PersonalAccessTokenRejected,
                    "GoTo rejected the personal access token (invalid_grant)",
                ),
                condition(AUTHORIZED, false, Reason::PersonalAccessTokenRejected, "x"),
            ],
            authorization: Some(AuthorizationStatus {
                phase: AuthorizationPhase::AwaitingAuthorization,
                reason: None,
                message: None,
            }),
            authorization_url: Some("https://op.example/authorize/ns/demo/abc".into()),
            ..Default::default()
        }));
        let summary = render(&rejected, Timestamp::UNIX_EPOCH);
        assert!(!summary.ready);
        assert_lines(
            &summary.text,
            &[
                "Ready:         False, PersonalAccessTokenRejected: GoTo rejected",
                "Link:          https://op.example/authorize/ns/demo/abc",
                "What to do:    Create a new personal access token at GoTo and store it in the `personalAccessTokenRef` Secret (the operator tries again when it changes), or send the link above to a GoTo admin.",
            ],
        );
    }

    /// The advice the CLI prints is the README's "Condition reasons" table, word for word.
    #[test]
    fn advice_matches_the_readme_table() {
        let readme = include_str!("../../README.md");
        for reason in Reason::ALL {
            let prefix = format!("| `{}` |", reason.as_str());
            let row = readme
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("README has no row for {}", reason.as_str()));
            let columns: Vec<&str> = row.trim_matches('|').split(" | ").collect();
            assert_eq!(
                columns.last().map(|c| c.trim()),
                Some(what_to_do(reason)),
                "{row}"
            );
        }
    }
}
