//! Plan: the pure decision of a reconcile. From what [`observe`](super::observe) read and the
//! time, [`plan`] decides which tokens are current, whether the Secret must be written (tokens
//! held in memory unstored, a move to a new `secretName`; a deleted or edited Secret is restored
//! by a refresh), whether to refresh now, what
//! blocks the client, where it stands with GoTo, what happens to the link, and when to look
//! again, and which grant a token request uses (the refresh token, or the personal access
//! token when there is no usable refresh token). [`Plan::settle`] folds in what the request did; the result is what the status is
//! computed from. No client, no clock, no randomness: every decision is table-tested below.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::{observe::Observed, schedule};
use crate::{
    conditions::{Authorization, Blocker, Reauthorization},
    resource::{
        ConsumedState, FORCE_REFRESH_ANNOTATION, GoToOAuthClient, GoToOAuthClientStatus,
        ROTATE_LINK_ANNOTATION, RejectedPersonalAccessToken, RolloutRestartStatus,
    },
    secret::StoredTokens,
    validation::ClientSettings,
};

/// Why the token Secret is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SecretWrite {
    /// Tokens from GoTo this replica holds but has not stored yet.
    StoreHeld,
    /// `spec.secretName` changed: write the new Secret, then delete the old one.
    Move { from: String },
}

/// Why a token request is sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefreshTrigger {
    Due,
    /// The refresh-requested annotation changed.
    Requested,
    /// No tokens the refresh token can renew: none stored, or GoTo rejected the refresh token,
    /// or they were issued to another client. The personal access token replaces them.
    NoUsableTokens,
    /// The Secret was deleted or edited, and this replica holds only the refresh token of what
    /// it stored ([`super::memory::HeldTokens`]): the refresh's new tokens restore it.
    Restore,
}

/// Which grant a token request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenRequest {
    /// The stored refresh token. When GoTo rejects it and `then_pat`, the personal access
    /// token is exchanged right after, in the same reconcile: no consent is needed.
    Refresh { then_pat: bool },
    /// Exchange the personal access token.
    PersonalAccessToken,
}

/// A token request to send now, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refresh {
    pub(crate) trigger: RefreshTrigger,
    pub(crate) request: TokenRequest,
}

/// What happens to the authorization link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// Publish this link (the current one).
    Keep(String),
    /// Publish a fresh link (first one, rotation requested, or the old one was spent).
    Replace,
    /// No link while it could not work (invalid spec, missing client secret, Secret conflict).
    Withdraw,
}

impl Link {
    /// The link token to publish; `fresh` makes a new one when the plan replaces it.
    pub(crate) fn resolve(&self, fresh: impl FnOnce() -> String) -> Option<String> {
        match self {
            Link::Keep(token) => Some(token.clone()),
            Link::Replace => Some(fresh()),
            Link::Withdraw => None,
        }
    }
}

/// The decisions of one reconcile, before the refresh (if any) is sent.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// The tokens that are current once `write` is done.
    pub(crate) tokens: Option<StoredTokens>,
    pub(crate) write: Option<SecretWrite>,
    pub(crate) refresh: Option<Refresh>,
    pub(crate) blocker: Option<Blocker>,
    pub(crate) authorization: Authorization,
    /// When the consent was given whose refresh token GoTo rejected, while those tokens stay.
    pub(crate) rejected_authorization: Option<Timestamp>,
    pub(crate) link: Link,
    pub(crate) handled_link_rotation: Option<String>,
    pub(crate) handled_refresh_request: Option<String>,
    /// The refresh-requested annotation as it is now.
    pub(crate) refresh_request: Option<String>,
    /// When the next refresh is due (only while refreshing is possible).
    pub(crate) next_refresh: Option<Timestamp>,
    pub(crate) refresh_failure: Option<String>,
    /// The token Secret lost the tokens (deleted or edited) and a refresh is to restore it:
    /// until one succeeds, `Ready` says so rather than that the Secret holds a valid token.
    pub(crate) secret_lost: bool,
    /// The Secret the tokens are stored in once `write` is done.
    pub(crate) secret_name: Option<String>,
    pub(crate) consumed_states: Vec<ConsumedState>,
    /// `status.rolloutRestart` as it stands; the reconcile's rollout step replaces it.
    pub(crate) rollout: Option<RolloutRestartStatus>,
    /// The personal access token GoTo rejected, while nothing it was sent with changed.
    pub(crate) rejected_personal_access_token: Option<Box<RejectedPersonalAccessToken>>,
    /// What a personal access token sent now is sent with (spec generation, PAT Secret and
    /// client-secret Secret versions), to recognise it after a rejection.
    pub(crate) pat_sent_with: Option<String>,
}

/// What the refresh that [`Plan::refresh`] asked for did.
#[derive(Clone, Debug)]
pub(crate) enum RefreshOutcome {
    /// New tokens, already stored.
    Refreshed(Box<StoredTokens>),
    /// A transient failure; the next attempt is at `retry_at`.
    Failed {
        message: String,
        retry_at: Timestamp,
    },
    /// GoTo rejected the refresh token: only a new consent (or personal access token) helps.
    Rejected { error: String },
    /// New tokens from the personal access token grant, already stored: a new grant, like a
    /// consent.
    Obtained(Box<StoredTokens>),
    /// GoTo rejected the personal access token.
    PatRejected { error: String },
    /// GoTo rejected the refresh token, then the personal access token was exchanged: `then`
    /// is what that did.
    AfterRejection {
        error: String,
        then: Box<RefreshOutcome>,
    },
    /// This replica no longer holds the Lease: nothing was sent.
    NotLeader,
}

/// How soon a replica that found it lost the Lease looks again (it stops meanwhile).
const NOT_LEADER_RETRY: SignedDuration = SignedDuration::from_secs(2);
/// Shortest requeue, so a time already past does not spin.
const MIN_REQUEUE: Duration = Duration::from_millis(500);

/// Decides what to do for the observed client at `now`.
pub(crate) fn plan(o: &Observed, now: Timestamp) -> Plan {
    let obj = &o.obj;
    let status = obj.status.clone().unwrap_or_default();
    let annotations = &obj.metadata.annotations;
    let annotation = |key: &str| annotations.as_ref().and_then(|a| a.get(key)).cloned();
    let rotate_request = annotation(ROTATE_LINK_ANNOTATION);
    let refresh_request = annotation(FORCE_REFRESH_ANNOTATION);

    let (tokens, mend) = choose_tokens(o);
    let restore_by_refresh = mend == Some(Mend::RefreshToRestore);
    let mut write = (mend == Some(Mend::StoreHeld)).then_some(SecretWrite::StoreHeld);
    // A restore's refresh writes the Secret under the new name too; a Secret left under the
    // old one is this client's and goes with it.
    if !o.conflict
        && !restore_by_refresh
        && let Some(from) = &o.previous_secret_name
    {
        write = Some(SecretWrite::Move { from: from.clone() });
    }
    let settings = o.settings.as_ref().ok();
    // Writes need a valid spec (the Secret is built from it) and a Secret that is ours.
    let can_store = settings.is_some() && !o.conflict;
    let (tokens, write) = match (tokens, can_store) {
        (Some(t), true) => (Some(t), write),
        (tokens, _) => (tokens, None),
    };

    let blocker = blocker(o);
    let rejected_authorization = status
        .rejected_authorization
        .as_ref()
        .map(|t| t.0)
        .filter(|at| {
            tokens
                .as_ref()
                .is_some_and(|t| t.authorized_at.as_second() == at.as_second())
        });
    let authorization = authorization(&status, settings, tokens.as_ref(), rejected_authorization);

    let mut handled_refresh_request = status.handled_refresh_request.clone();
    if refresh_request.is_some() && o.memory.answered_refresh_request == refresh_request {
        handled_refresh_request = refresh_request.clone();
    }

    // The personal access token, and whether GoTo rejected it as it is now.
    let pat_sent_with = match (&o.personal_access_token, settings) {
        (Some(Ok(pat)), Some(_)) => Some(format!(
            "{}/{}/{}",
            obj.metadata.generation.unwrap_or_default(),
            pat.resource_version.as_deref().unwrap_or_default(),
            o.client_secret_version.as_deref().unwrap_or_default(),
        )),
        _ => None,
    };
    let rejected_personal_access_token = status
        .rejected_personal_access_token
        .clone()
        .filter(|r| Some(&r.sent_with) == pat_sent_with.as_ref());
    let pat_usable = pat_sent_with.is_some() && rejected_personal_access_token.is_none();

    // Token requests need our tokens (or none yet) and a client secret.
    let can_request = can_store && matches!(o.credentials, Some(Ok(_)));
    // Tokens the refresh token cannot renew: the personal access token must replace them.
    let needs_pat = match &tokens {
        None => true,
        Some(t) => t.refresh_token.is_none() || !authorization.is_authorized(),
    };
    let mut blocker = blocker;
    if blocker.is_none() && can_request && needs_pat && !pat_usable {
        blocker = match (&o.personal_access_token, &rejected_personal_access_token) {
            (Some(Err(problem)), _) => Some(Blocker::PersonalAccessTokenMissing(problem.clone())),
            (_, Some(rejected)) => Some(Blocker::PersonalAccessTokenRejected {
                error: rejected.error.clone(),
            }),
            _ => None,
        };
    }

    let (mut refresh, mut next_refresh) = (None, None);
    let not_before = o.memory.backoff.not_before.unwrap_or(now);
    let requested = refresh_request.is_some() && refresh_request != handled_refresh_request;
    match (&tokens, settings) {
        (Some(current), Some(settings)) if can_request && authorization.is_authorized() => {
            let request = match (&current.refresh_token, pat_usable) {
                (Some(_), then_pat) => Some(TokenRequest::Refresh { then_pat }),
                (None, true) => Some(TokenRequest::PersonalAccessToken),
                (None, false) => None,
            };
            let due = schedule::next_refresh_at(current, settings.refresh_before, &o.keys.uid);
            let when = if requested || restore_by_refresh {
                not_before
            } else {
                due.max(not_before)
            };
            if let Some(request) = request {
                if when <= now {
                    let trigger = match (restore_by_refresh, requested) {
                        (true, _) => RefreshTrigger::Restore,
                        (false, true) => RefreshTrigger::Requested,
                        (false, false) => RefreshTrigger::Due,
                    };
                    refresh = Some(Refresh { trigger, request });
                }
                next_refresh = Some(when);
            }
        }
        _ if can_request && needs_pat && pat_usable => {
            if not_before <= now {
                refresh = Some(Refresh {
                    trigger: RefreshTrigger::NoUsableTokens,
                    request: TokenRequest::PersonalAccessToken,
                });
            }
            next_refresh = Some(not_before);
        }
        _ => {}
    }

    let mut handled_link_rotation = status.handled_link_rotation.clone();
    let mut link = match crate::consent::link_token(Some(&status)) {
        Some(token) => Link::Keep(token),
        None => Link::Replace,
    };
    if rotate_request.is_some() && rotate_request != handled_link_rotation {
        link = Link::Replace;
        handled_link_rotation = rotate_request;
    }
    if blocker.as_ref().is_some_and(Blocker::withdraws_link) {
        link = Link::Withdraw;
    }

    let secret_name = match (&tokens, settings) {
        (None, _) => None,
        (Some(_), Some(settings)) if !o.conflict => Some(settings.secret_name.clone()),
        (Some(_), _) => status.secret_name.clone(),
    };
    Plan {
        tokens,
        write,
        refresh,
        blocker,
        authorization,
        rejected_authorization,
        link,
        handled_link_rotation,
        handled_refresh_request,
        refresh_request,
        next_refresh,
        refresh_failure: o.memory.backoff.last_failure.clone(),
        secret_lost: restore_by_refresh,
        secret_name,
        consumed_states: status.consumed_states.clone(),
        rollout: status.rollout_restart.as_deref().cloned(),
        rejected_personal_access_token,
        pat_sent_with,
    }
}

/// How the current tokens reach the Secret, when it does not hold them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mend {
    /// Write the tokens held unstored.
    StoreHeld,
    /// What this replica stored is gone from the Secret (deleted or edited): it holds only the
    /// refresh token of those tokens (see [`super::memory::HeldTokens`]), so a refresh with it
    /// writes the Secret anew.
    RefreshToRestore,
}

/// Which tokens are current, and how the Secret comes to hold them: tokens held unstored win
/// unless a newer consent replaced them; the Secret's win when they are newer (a refresh or
/// consent on another replica) or are what this replica stored; otherwise what it stored was
/// deleted or edited, and is restored.
fn choose_tokens(o: &Observed) -> (Option<StoredTokens>, Option<Mend>) {
    let Some(entry) = o.memory.held.as_ref() else {
        return (o.stored.clone(), None);
    };
    let (held, stored_before) = (entry.tokens(), entry.stored());
    match &o.stored {
        Some(stored) if !stored_before => {
            if stored.authorized_at > held.authorized_at {
                (Some(stored.clone()), None)
            } else {
                (Some(held), Some(Mend::StoreHeld))
            }
        }
        None if o.conflict => (None, None),
        None if stored_before => (Some(held), Some(Mend::RefreshToRestore)),
        None => (Some(held), Some(Mend::StoreHeld)),
        Some(stored) => {
            let newer =
                stored.issued_at > held.issued_at || stored.authorized_at > held.authorized_at;
            // At the version this replica stored them at, the Secret holds them (that is how
            // `observe` answers without a read: with the held tokens, the access token left out).
            let at_stored_version = o.target.as_ref().is_some_and(|t| {
                t.resource_version.is_some() && t.resource_version == entry.resource_version
            });
            if at_stored_version || entry.stored_as(stored) || newer {
                (Some(stored.clone()), None)
            } else {
                (Some(held), Some(Mend::RefreshToRestore))
            }
        }
    }
}

/// The first thing that stops the operator from acting for this client.
fn blocker(o: &Observed) -> Option<Blocker> {
    match (&o.settings, &o.credentials) {
        (Err(invalid), _) => Some(Blocker::InvalidSpec(invalid.clone())),
        _ if o.conflict => Some(Blocker::SecretConflict {
            namespace: o.keys.namespace.clone(),
            name: o.obj.target_secret_name(),
        }),
        (_, Some(Err(problem))) => Some(Blocker::ClientSecretMissing(problem.clone())),
        _ => None,
    }
}

/// Where the client stands with GoTo, from typed status fields and the current tokens.
fn authorization(
    status: &GoToOAuthClientStatus,
    settings: Option<&ClientSettings>,
    tokens: Option<&StoredTokens>,
    rejected_authorization: Option<Timestamp>,
) -> Authorization {
    let Some(tokens) = tokens else {
        // A failed consent stands until one succeeds.
        return Authorization::consent_failure(status.authorization.as_ref())
            .unwrap_or(Authorization::Awaiting);
    };
    if let Some(settings) = settings
        && !tokens.issued_to(settings)
    {
        return Authorization::ReauthorizationRequired(Reauthorization::ClientChanged {
            issued_client_id: tokens.client_id.clone(),
            issued_token_url: tokens.token_url.clone(),
            client_id: settings.client_id.clone(),
            token_url: settings.token_url.to_string(),
        });
    }
    // Sticky: a rejected refresh token stays rejected until a new consent replaces it.
    if rejected_authorization.is_some() {
        return Authorization::ReauthorizationRequired(Authorization::recorded_rejection(
            status.authorization.as_ref(),
        ));
    }
    Authorization::Authorized {
        principal: tokens.principal.clone(),
    }
}

impl Plan {
    /// The plan after the refresh it asked for (if any) happened: what the status describes.
    pub(crate) fn settle(
        mut self,
        outcome: Option<RefreshOutcome>,
        settings: Option<&ClientSettings>,
        uid: &str,
        now: Timestamp,
    ) -> Plan {
        match outcome {
            None => {}
            Some(RefreshOutcome::Refreshed(new)) => {
                self.next_refresh =
                    settings.map(|s| schedule::next_refresh_at(&new, s.refresh_before, uid));
                self.tokens = Some(*new);
                self.refresh_failure = None;
                self.secret_lost = false;
                self.handled_refresh_request = self.refresh_request.clone();
            }
            Some(RefreshOutcome::NotLeader) => {
                self.next_refresh = Some(now + NOT_LEADER_RETRY);
            }
            Some(RefreshOutcome::Failed { message, retry_at }) => {
                self.refresh_failure = Some(message);
                self.next_refresh = Some(retry_at);
            }
            Some(RefreshOutcome::Obtained(new)) => {
                self.next_refresh =
                    settings.map(|s| schedule::next_refresh_at(&new, s.refresh_before, uid));
                self.authorization = Authorization::Authorized {
                    principal: new.principal.clone(),
                };
                self.tokens = Some(*new);
                self.refresh_failure = None;
                self.secret_lost = false;
                self.rejected_authorization = None;
                self.rejected_personal_access_token = None;
                self.handled_refresh_request = self.refresh_request.clone();
            }
            Some(RefreshOutcome::PatRejected { error }) => {
                self.blocker = Some(Blocker::PersonalAccessTokenRejected {
                    error: error.clone(),
                });
                self.rejected_personal_access_token = self
                    .pat_sent_with
                    .clone()
                    .map(|sent_with| Box::new(RejectedPersonalAccessToken { sent_with, error }));
                self.refresh_failure = None;
                self.handled_refresh_request = self.refresh_request.clone();
                self.next_refresh = None;
            }
            Some(RefreshOutcome::AfterRejection { error, then }) => {
                return self
                    .settle(Some(RefreshOutcome::Rejected { error }), settings, uid, now)
                    .settle(Some(*then), settings, uid, now);
            }
            Some(RefreshOutcome::Rejected { error }) => {
                self.authorization =
                    Authorization::ReauthorizationRequired(Reauthorization::RefreshTokenRejected {
                        error: Some(error),
                    });
                self.rejected_authorization = self.tokens.as_ref().map(|t| t.authorized_at);
                self.handled_refresh_request = self.refresh_request.clone();
                self.next_refresh = None;
                // A fresh link for the re-authorization.
                if self.link != Link::Withdraw {
                    self.link = Link::Replace;
                }
            }
        }
        self
    }

    /// The plan of a consent that just stored `tokens` (the callback path): authorized, no
    /// failure, refresh on schedule, and the used link replaced.
    pub(crate) fn after_consent(
        obj: &GoToOAuthClient,
        settings: &ClientSettings,
        tokens: StoredTokens,
        uid: &str,
    ) -> Plan {
        let status = obj.status.clone().unwrap_or_default();
        let refresh_request = obj
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORCE_REFRESH_ANNOTATION))
            .cloned();
        Plan {
            next_refresh: Some(schedule::next_refresh_at(
                &tokens,
                settings.refresh_before,
                uid,
            )),
            authorization: Authorization::Authorized {
                principal: tokens.principal.clone(),
            },
            tokens: Some(tokens),
            write: None,
            refresh: None,
            blocker: None,
            rejected_authorization: None,
            link: Link::Replace,
            handled_link_rotation: status.handled_link_rotation,
            handled_refresh_request: refresh_request.clone(),
            refresh_request,
            refresh_failure: None,
            secret_lost: false,
            secret_name: Some(settings.secret_name.clone()),
            rejected_personal_access_token: status.rejected_personal_access_token,
            pat_sent_with: None,
            consumed_states: status.consumed_states,
            rollout: status.rollout_restart.map(|r| *r),
        }
    }

    /// The plan of a failed consent attempt while no tokens are stored (the callback path):
    /// the status as it is, with the failure as the authorization phase.
    pub(crate) fn failed_consent(
        status: &GoToOAuthClientStatus,
        authorization: Authorization,
    ) -> Plan {
        Plan {
            tokens: None,
            write: None,
            refresh: None,
            blocker: None,
            authorization,
            rejected_authorization: None,
            link: match crate::consent::link_token(Some(status)) {
                Some(token) => Link::Keep(token),
                None => Link::Withdraw,
            },
            handled_link_rotation: status.handled_link_rotation.clone(),
            handled_refresh_request: status.handled_refresh_request.clone(),
            refresh_request: None,
            next_refresh: None,
            refresh_failure: None,
            secret_lost: false,
            secret_name: None,
            consumed_states: status.consumed_states.clone(),
            rollout: status.rollout_restart.as_deref().cloned(),
            rejected_personal_access_token: status.rejected_personal_access_token.clone(),
            pat_sent_with: None,
        }
    }

    /// When to reconcile again on its own: the next refresh, the token's expiry (Ready turns
    /// False then), or a consumed state running out. Everything else arrives by watch.
    pub(crate) fn wake_at(&self, now: Timestamp) -> Option<Timestamp> {
        let expiry = self
            .tokens
            .as_ref()
            .map(|t| t.expires_at)
            .filter(|at| *at > now);
        let state = self
            .consumed_states
            .iter()
            .filter(|c| c.expires_at > now.as_second())
            .map(|c| c.expires_at)
            .min()
            .and_then(|s| Timestamp::from_second(s).ok());
        let restart = super::rollout::wake_at(self.rollout.as_ref());
        [self.next_refresh, expiry, state, restart]
            .into_iter()
            .flatten()
            .min()
    }

    /// The requeue delay for [`Plan::wake_at`].
    pub(crate) fn requeue_after(&self, now: Timestamp) -> Option<Duration> {
        self.wake_at(now).map(|at| {
            Duration::try_from(at.duration_since(now))
                .unwrap_or(Duration::ZERO)
                .max(MIN_REQUEUE)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use secrecy::{ExposeSecret, SecretString};

    use super::*;
    use crate::{
        conditions::{ClientSecretProblem, PersonalAccessTokenProblem, Reason},
        controller::{
            fixtures::{at, settings, tokens},
            memory::{Backoff, ClientMemory, HeldTokens},
            observe::{PersonalAccessToken, TargetSecret},
        },
        goto::ClientCredentials,
        resource::{
            AuthorizationPhase, AuthorizationReason, AuthorizationStatus, PersonalAccessTokenRef,
            TokenGrant,
        },
        validation::{InvalidSpec, SecretKeyRef},
    };

    const NOW: &str = "2026-11-23T10:00:00Z";
    const LINK: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCD";

    /// An authorized client with a link, its tokens in the Secret, nothing in memory.
    fn observed(stored: Option<StoredTokens>) -> Observed {
        let (mut obj, keys) = crate::controller::fixtures::demo_client();
        obj.status = Some(GoToOAuthClientStatus {
            authorization_url: Some(format!("https://op.example/authorize/ns/demo/{LINK}")),
            ..Default::default()
        });
        Observed {
            obj: Arc::new(obj),
            keys,
            settings: Ok(settings()),
            credentials: Some(Ok(ClientCredentials {
                client_id: "client".into(),
                client_secret: SecretString::from("secret"),
            })),
            client_secret_version: Some("5".into()),
            personal_access_token: None,
            target: None,
            conflict: false,
            previous_secret_name: None,
            stored,
            memory: ClientMemory::default(),
        }
    }

    fn with_status(mut o: Observed, f: impl FnOnce(&mut GoToOAuthClientStatus)) -> Observed {
        let obj = Arc::make_mut(&mut o.obj);
        f(obj.status.get_or_insert_with(Default::default));
        o
    }

    fn annotate(mut o: Observed, key: &str, value: &str) -> Observed {
        Arc::make_mut(&mut o.obj)
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into());
        o
    }

    fn held(tokens: StoredTokens, stored: bool) -> Option<HeldTokens> {
        Some(HeldTokens::new(&tokens, stored, None, None, 0))
    }

    #[test]
    fn token_choice_and_secret_writes() {
        let old = tokens("2026-11-23T09:00:00Z", "2026-11-01T00:00:00Z", "r1");
        let new = tokens("2026-11-23T09:40:00Z", "2026-11-01T00:00:00Z", "r2");
        let reconsented = tokens("2026-11-23T09:50:00Z", "2026-11-23T09:50:00Z", "r3");
        // (what the Secret holds, what memory holds, conflict) → (current tokens, write)
        type Case<'a> = (
            &'a str,
            Option<&'a StoredTokens>,
            Option<HeldTokens>,
            bool,
            Option<&'a StoredTokens>,
            Option<SecretWrite>,
        );
        let cases: Vec<Case> = vec![
            ("nothing anywhere", None, None, false, None, None),
            (
                "the Secret as it is",
                Some(&old),
                None,
                false,
                Some(&old),
                None,
            ),
            (
                "what was stored, unchanged",
                Some(&old),
                held(old.clone(), true),
                false,
                Some(&old),
                None,
            ),
            (
                "held unstored tokens are written first",
                Some(&old),
                held(new.clone(), false),
                false,
                Some(&new),
                Some(SecretWrite::StoreHeld),
            ),
            (
                "a newer consent supersedes held tokens",
                Some(&reconsented),
                held(new.clone(), false),
                false,
                Some(&reconsented),
                None,
            ),
            (
                "another replica's refresh is newer",
                Some(&new),
                held(old.clone(), true),
                false,
                Some(&new),
                None,
            ),
            (
                "a foreign Secret is never written",
                None,
                held(old.clone(), true),
                true,
                None,
                None,
            ),
        ];
        for (what, stored, memory, conflict, want_tokens, want_write) in cases {
            let mut o = observed(stored.cloned());
            o.memory.held = memory;
            o.conflict = conflict;
            let p = plan(&o, at(NOW));
            assert_eq!(p.tokens.as_ref(), want_tokens, "{what}: tokens");
            assert_eq!(p.write, want_write, "{what}: write");
        }
    }

    /// Held as stored at version 5: without the access token.
    fn shed(tokens: &StoredTokens) -> Option<HeldTokens> {
        Some(HeldTokens::new(tokens, true, Some("5".into()), None, 0))
    }

    #[test]
    fn stored_tokens_are_never_written_back_a_refresh_restores_instead() {
        let t = tokens("2026-11-23T09:50:00Z", "2026-11-01T00:00:00Z", "r1");
        let mut without_access = t.clone();
        without_access.access_token = SecretString::from(String::new());
        let edited = tokens("2026-11-23T09:50:00Z", "2026-11-01T00:00:00Z", "garbage");
        // (what, the Secret's tokens, the previous Secret's name)
        //   → (write, refresh trigger, the refresh token of the tokens chosen)
        type Case<'a> = (
            &'a str,
            Option<(StoredTokens, String)>,
            Option<(&'a str, Option<&'a StoredTokens>)>,
            Option<SecretWrite>,
            Option<RefreshTrigger>,
            &'a str,
        );
        let restore = Some(RefreshTrigger::Restore);
        let mut access_edited = t.clone();
        access_edited.access_token = SecretString::from("hand-edited-access-token");
        // The Secret's tokens and version (`None`: no Secret under the target name).
        let secret_at = |tokens: &StoredTokens, rv: &str| Some((tokens.clone(), rv.to_string()));
        let cases: Vec<Case> = vec![
            (
                "the Secret as held",
                secret_at(&without_access, "5"),
                None,
                None,
                None,
                "r1",
            ),
            (
                "read again at another version",
                secret_at(&t, "6"),
                None,
                None,
                None,
                "r1",
            ),
            ("deleted", None, None, None, restore, "r1"),
            ("edited", secret_at(&edited, "6"), None, None, restore, "r1"),
            (
                "the access token edited",
                secret_at(&access_edited, "6"),
                None,
                None,
                restore,
                "r1",
            ),
            (
                "renamed: the old Secret's tokens are moved",
                None,
                Some(("old-token", Some(&t))),
                Some(SecretWrite::Move {
                    from: "old-token".into(),
                }),
                None,
                "r1",
            ),
            (
                "renamed, the old Secret gone too",
                None,
                Some(("old-token", None)),
                None,
                restore,
                "r1",
            ),
        ];
        for (what, secret, previous, want_write, want_refresh, want_refresh_token) in cases {
            let mut o = observed(secret.as_ref().map(|(tokens, _)| tokens.clone()));
            o.target = secret.map(|(_, rv)| TargetSecret {
                resource_version: Some(rv),
                owned: true,
            });
            o.memory.held = shed(&t);
            if let Some((name, tokens)) = previous {
                o.previous_secret_name = Some(name.to_string());
                // With no Secret under the new name, the old one's tokens (gone: none).
                o.stored = tokens.cloned();
            }
            let p = plan(&o, at(NOW));
            assert_eq!(p.write, want_write, "{what}: write");
            assert_eq!(
                p.refresh.map(|r| r.trigger),
                want_refresh,
                "{what}: refresh"
            );
            assert_eq!(p.secret_lost, want_refresh.is_some(), "{what}: lost");
            let refresh_token = p.tokens.and_then(|t| t.refresh_token);
            assert_eq!(
                refresh_token.as_ref().map(|r| r.expose_secret()),
                Some(want_refresh_token),
                "{what}: the held refresh token"
            );
        }

        // A restore waits out a backoff like any refresh.
        let mut o = observed(None);
        o.memory.held = shed(&t);
        o.memory.backoff.not_before = Some(at("2026-11-23T10:00:05Z"));
        let p = plan(&o, at(NOW));
        assert_eq!((p.write, p.refresh, p.secret_lost), (None, None, true));
        assert_eq!(p.next_refresh, Some(at("2026-11-23T10:00:05Z")));
    }

    #[test]
    fn a_renamed_secret_is_moved() {
        let t = tokens("2026-11-23T09:50:00Z", "2026-11-01T00:00:00Z", "r");
        let mut o = observed(Some(t.clone()));
        o.previous_secret_name = Some("old-token".into());
        let p = plan(&o, at(NOW));
        assert_eq!(
            p.write,
            Some(SecretWrite::Move {
                from: "old-token".into()
            })
        );
        assert_eq!(p.secret_name.as_deref(), Some("demo-token"));
    }

    #[test]
    fn refresh_decisions() {
        let fresh = tokens("2026-11-23T09:50:00Z", "2026-11-01T00:00:00Z", "r");
        let due = tokens("2026-11-23T09:15:00Z", "2026-11-01T00:00:00Z", "r");
        let backing_off = Backoff {
            refresh_failures: 1,
            not_before: Some(at("2026-11-23T10:00:05Z")),
            last_failure: Some("GoTo token endpoint failed (HTTP 500)".into()),
            reconcile_errors: 0,
        };
        let cases: Vec<(&str, Observed, Option<RefreshTrigger>)> = vec![
            ("not due yet", observed(Some(fresh.clone())), None),
            (
                "due",
                observed(Some(due.clone())),
                Some(RefreshTrigger::Due),
            ),
            (
                "requested",
                annotate(observed(Some(fresh.clone())), FORCE_REFRESH_ANNOTATION, "1"),
                Some(RefreshTrigger::Requested),
            ),
            (
                "request already handled",
                with_status(
                    annotate(observed(Some(fresh.clone())), FORCE_REFRESH_ANNOTATION, "1"),
                    |s| s.handled_refresh_request = Some("1".into()),
                ),
                None,
            ),
            (
                "request answered, status not written yet",
                {
                    let mut o =
                        annotate(observed(Some(fresh.clone())), FORCE_REFRESH_ANNOTATION, "1");
                    o.memory.answered_refresh_request = Some("1".into());
                    o
                },
                None,
            ),
            (
                "due but backing off",
                {
                    let mut o = observed(Some(due.clone()));
                    o.memory.backoff = backing_off.clone();
                    o
                },
                None,
            ),
            (
                "no client secret",
                {
                    let mut o = observed(Some(due.clone()));
                    o.credentials = Some(Err(ClientSecretProblem::SecretNotFound {
                        namespace: "ns".into(),
                        name: "creds".into(),
                    }));
                    o
                },
                None,
            ),
            (
                "refresh token rejected",
                with_status(observed(Some(due.clone())), |s| {
                    s.rejected_authorization = Some(Time(due.authorized_at))
                }),
                None,
            ),
            (
                "Secret conflict",
                {
                    let mut o = observed(Some(due.clone()));
                    o.conflict = true;
                    o
                },
                None,
            ),
            (
                "client id changed",
                {
                    let mut o = observed(Some(due.clone()));
                    o.settings = Ok(ClientSettings {
                        client_id: "other".into(),
                        ..settings()
                    });
                    o
                },
                None,
            ),
        ];
        for (what, o, want) in cases {
            assert_eq!(plan(&o, at(NOW)).refresh.map(|r| r.trigger), want, "{what}");
        }
    }

    #[test]
    fn next_refresh_waits_for_backoff() {
        let mut o = observed(Some(tokens(
            "2026-11-23T09:15:00Z",
            "2026-11-01T00:00:00Z",
            "r",
        )));
        o.memory.backoff.not_before = Some(at("2026-11-23T10:00:05Z"));
        let p = plan(&o, at(NOW));
        assert_eq!(p.next_refresh, Some(at("2026-11-23T10:00:05Z")));
        assert_eq!(p.requeue_after(at(NOW)), Some(Duration::from_secs(5)));
    }

    #[test]
    fn authorization_phases() {
        let t = tokens("2026-11-23T09:50:00Z", "2026-11-01T00:00:00Z", "r");
        let failed = AuthorizationStatus {
            phase: AuthorizationPhase::ConsentFailed,
            reason: Some(AuthorizationReason::AccessDenied),
            message: Some("Deny was clicked".into()),
        };
        let rejected = AuthorizationStatus {
            phase: AuthorizationPhase::ReauthorizationRequired,
            reason: Some(AuthorizationReason::RefreshTokenRejected),
            message: Some("GoTo rejected the refresh token (invalid_grant)".into()),
        };
        let cases: Vec<(&str, Observed, Authorization)> = vec![
            ("no consent yet", observed(None), Authorization::Awaiting),
            (
                "consent failure stands",
                with_status(observed(None), |s| s.authorization = Some(failed.clone())),
                Authorization::ConsentFailed {
                    failure: crate::conditions::ConsentFailure::AccessDenied,
                    message: "Deny was clicked".into(),
                },
            ),
            (
                "tokens replace a failure",
                with_status(observed(Some(t.clone())), |s| {
                    s.authorization = Some(failed.clone())
                }),
                Authorization::Authorized {
                    principal: Some("admin@example.com".into()),
                },
            ),
            (
                "rejection is sticky",
                with_status(observed(Some(t.clone())), |s| {
                    s.authorization = Some(rejected.clone());
                    s.rejected_authorization = Some(Time(t.authorized_at));
                }),
                Authorization::ReauthorizationRequired(Reauthorization::RefreshTokenRejected {
                    error: Some("invalid_grant".into()),
                }),
            ),
            (
                "a new consent clears the rejection",
                with_status(observed(Some(t.clone())), |s| {
                    s.authorization = Some(rejected.clone());
                    s.rejected_authorization = Some(Time(at("2026-10-01T00:00:00Z")));
                }),
                Authorization::Authorized {
                    principal: Some("admin@example.com".into()),
                },
            ),
        ];
        for (what, o, want) in cases {
            assert_eq!(plan(&o, at(NOW)).authorization, want, "{what}");
        }
    }

    #[test]
    fn blockers_withdraw_the_link() {
        let invalid = {
            let mut o = observed(None);
            o.settings = Err(InvalidSpec {
                problems: vec!["spec.clientId must not be empty".into()],
            });
            o.credentials = None;
            o
        };
        let p = plan(&invalid, at(NOW));
        assert!(matches!(p.blocker, Some(Blocker::InvalidSpec(_))));
        assert_eq!(p.link, Link::Withdraw);

        let mut conflict = observed(None);
        conflict.conflict = true;
        assert!(matches!(
            plan(&conflict, at(NOW)).blocker,
            Some(Blocker::SecretConflict { .. })
        ));

        assert_eq!(plan(&observed(None), at(NOW)).link, Link::Keep(LINK.into()));
    }

    #[test]
    fn rotation_replaces_the_link_once() {
        let o = annotate(observed(None), ROTATE_LINK_ANNOTATION, "r1");
        let p = plan(&o, at(NOW));
        assert_eq!(p.link, Link::Replace);
        assert_eq!(p.handled_link_rotation.as_deref(), Some("r1"));
        let o = with_status(o, |s| s.handled_link_rotation = Some("r1".into()));
        assert_eq!(plan(&o, at(NOW)).link, Link::Keep(LINK.into()));
    }

    #[test]
    fn settling_a_refresh() {
        let due = tokens("2026-11-23T09:15:00Z", "2026-11-01T00:00:00Z", "r");
        let o = annotate(observed(Some(due.clone())), FORCE_REFRESH_ANNOTATION, "x");
        let p = plan(&o, at(NOW));
        let new = tokens(NOW, "2026-11-01T00:00:00Z", "r2");
        let refreshed = p.clone().settle(
            Some(RefreshOutcome::Refreshed(Box::new(new.clone()))),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert_eq!(refreshed.tokens.as_ref(), Some(&new));
        assert_eq!(refreshed.handled_refresh_request.as_deref(), Some("x"));
        assert!(refreshed.next_refresh.is_some_and(|t| t > at(NOW)));

        let rejected = p.clone().settle(
            Some(RefreshOutcome::Rejected {
                error: "invalid_grant".into(),
            }),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert_eq!(rejected.rejected_authorization, Some(due.authorized_at));
        assert_eq!(rejected.link, Link::Replace);
        assert_eq!(rejected.next_refresh, None);

        let failed = p.settle(
            Some(RefreshOutcome::Failed {
                message: "timeout".into(),
                retry_at: at("2026-11-23T10:00:10Z"),
            }),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert_eq!(failed.refresh_failure.as_deref(), Some("timeout"));
        assert_eq!(failed.next_refresh, Some(at("2026-11-23T10:00:10Z")));
    }

    /// A client whose spec names a personal access token, readable at Secret version `pat_rv`.
    fn with_pat(mut o: Observed, pat_rv: &str) -> Observed {
        o.personal_access_token = Some(Ok(PersonalAccessToken {
            value: SecretString::from("pat-value"),
            resource_version: Some(pat_rv.into()),
        }));
        let obj = Arc::make_mut(&mut o.obj);
        obj.metadata.generation = Some(3);
        obj.spec.personal_access_token_ref = Some(Box::new(PersonalAccessTokenRef {
            name: "pat".into(),
            key: "personalAccessToken".into(),
        }));
        if let Ok(settings) = &mut o.settings {
            settings.personal_access_token = Some(SecretKeyRef {
                name: "pat".into(),
                key: "personalAccessToken".into(),
            });
        }
        o
    }

    fn pat_tokens(issued: &str, refresh: Option<&str>) -> StoredTokens {
        StoredTokens {
            refresh_token: refresh.map(SecretString::from),
            obtained_by: TokenGrant::PersonalAccessToken,
            ..tokens(issued, issued, "unused")
        }
    }

    fn rejected_pat(sent_with: &str) -> Box<RejectedPersonalAccessToken> {
        Box::new(RejectedPersonalAccessToken {
            sent_with: sent_with.into(),
            error: "GoTo rejected the grant (invalid_grant)".into(),
        })
    }

    #[test]
    fn personal_access_token_decisions() {
        let due_pat_only = pat_tokens("2026-11-23T09:15:00Z", None);
        let fresh_pat_only = pat_tokens("2026-11-23T09:50:00Z", None);
        let due_with_refresh = pat_tokens("2026-11-23T09:15:00Z", Some("r"));
        let consent_due = tokens("2026-11-23T09:15:00Z", "2026-11-01T00:00:00Z", "r");
        let pat = TokenRequest::PersonalAccessToken;
        let no_tokens = RefreshTrigger::NoUsableTokens;
        // (what, observed) → (token request, blocker reason)
        type Case = (
            &'static str,
            Observed,
            Option<(RefreshTrigger, TokenRequest)>,
            Option<Reason>,
        );
        let cases: Vec<Case> = vec![
            (
                "no tokens and a PAT: exchange it",
                with_pat(observed(None), "7"),
                Some((no_tokens, pat)),
                None,
            ),
            (
                "no tokens and no PAT: wait for a consent",
                observed(None),
                None,
                None,
            ),
            (
                "a refresh token is stored: refresh, the PAT as fallback",
                with_pat(observed(Some(due_with_refresh.clone())), "7"),
                Some((
                    RefreshTrigger::Due,
                    TokenRequest::Refresh { then_pat: true },
                )),
                None,
            ),
            (
                "no refresh token stored and due: the PAT again",
                with_pat(observed(Some(due_pat_only.clone())), "7"),
                Some((RefreshTrigger::Due, pat)),
                None,
            ),
            (
                "no refresh token stored, not due yet",
                with_pat(observed(Some(fresh_pat_only.clone())), "7"),
                None,
                None,
            ),
            (
                "refresh token rejected: the PAT replaces it",
                with_pat(
                    with_status(observed(Some(consent_due.clone())), |s| {
                        s.rejected_authorization = Some(Time(consent_due.authorized_at))
                    }),
                    "7",
                ),
                Some((no_tokens, pat)),
                None,
            ),
            (
                "PAT rejected as it is: blocked, nothing sent",
                with_pat(
                    with_status(observed(None), |s| {
                        s.rejected_personal_access_token = Some(rejected_pat("3/7/5"))
                    }),
                    "7",
                ),
                None,
                Some(Reason::PersonalAccessTokenRejected),
            ),
            (
                "PAT rejected, then its Secret changed: exchange again",
                with_pat(
                    with_status(observed(None), |s| {
                        s.rejected_personal_access_token = Some(rejected_pat("3/7/5"))
                    }),
                    "8",
                ),
                Some((no_tokens, pat)),
                None,
            ),
            (
                "PAT rejected, refresh token stored: refresh without fallback",
                with_pat(
                    with_status(observed(Some(due_with_refresh.clone())), |s| {
                        s.rejected_personal_access_token = Some(rejected_pat("3/7/5"))
                    }),
                    "7",
                ),
                Some((
                    RefreshTrigger::Due,
                    TokenRequest::Refresh { then_pat: false },
                )),
                None,
            ),
            (
                "PAT rejected, no refresh token: blocked although tokens live",
                with_pat(
                    with_status(observed(Some(due_pat_only.clone())), |s| {
                        s.rejected_personal_access_token = Some(rejected_pat("3/7/5"))
                    }),
                    "7",
                ),
                None,
                Some(Reason::PersonalAccessTokenRejected),
            ),
            (
                "PAT Secret missing and no tokens",
                {
                    let mut o = with_pat(observed(None), "7");
                    o.personal_access_token =
                        Some(Err(PersonalAccessTokenProblem::SecretNotFound {
                            namespace: "ns".into(),
                            name: "pat".into(),
                        }));
                    o
                },
                None,
                Some(Reason::PersonalAccessTokenMissing),
            ),
            (
                "PAT Secret missing but the refresh token works: not needed",
                {
                    let mut o = with_pat(observed(Some(due_with_refresh.clone())), "7");
                    o.personal_access_token =
                        Some(Err(PersonalAccessTokenProblem::SecretNotFound {
                            namespace: "ns".into(),
                            name: "pat".into(),
                        }));
                    o
                },
                Some((
                    RefreshTrigger::Due,
                    TokenRequest::Refresh { then_pat: false },
                )),
                None,
            ),
            (
                "backing off after a failed exchange",
                {
                    let mut o = with_pat(observed(None), "7");
                    o.memory.backoff.not_before = Some(at("2026-11-23T10:00:05Z"));
                    o
                },
                None,
                None,
            ),
            (
                "no client secret: nothing is sent",
                {
                    let mut o = with_pat(observed(None), "7");
                    o.credentials = Some(Err(ClientSecretProblem::SecretNotFound {
                        namespace: "ns".into(),
                        name: "creds".into(),
                    }));
                    o
                },
                None,
                Some(Reason::ClientSecretMissing),
            ),
        ];
        for (what, o, want, want_blocker) in cases {
            let p = plan(&o, at(NOW));
            assert_eq!(
                p.refresh.map(|r| (r.trigger, r.request)),
                want,
                "{what}: request"
            );
            assert_eq!(
                p.blocker.as_ref().map(Blocker::reason),
                want_blocker,
                "{what}: blocker"
            );
            // The link stays for a consent unless the consent could not work either.
            if want_blocker.is_some_and(|r| r != Reason::ClientSecretMissing) {
                assert_eq!(p.link, Link::Keep(LINK.into()), "{what}: link");
            }
        }
    }

    #[test]
    fn settling_personal_access_token_outcomes() {
        let o = with_pat(observed(None), "7");
        let p = plan(&o, at(NOW));
        assert_eq!(p.pat_sent_with.as_deref(), Some("3/7/5"));
        let new = pat_tokens(NOW, None);
        let obtained = p.clone().settle(
            Some(RefreshOutcome::Obtained(Box::new(new.clone()))),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert_eq!(obtained.tokens.as_ref(), Some(&new));
        assert!(obtained.authorization.is_authorized());
        assert!(obtained.next_refresh.is_some_and(|t| t > at(NOW)));
        assert_eq!(
            obtained.link,
            Link::Keep(LINK.into()),
            "the link was not used"
        );

        let rejected = p.clone().settle(
            Some(RefreshOutcome::PatRejected {
                error: "GoTo rejected the grant (invalid_grant)".into(),
            }),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert_eq!(
            rejected.rejected_personal_access_token,
            Some(rejected_pat("3/7/5"))
        );
        assert!(matches!(
            rejected.blocker,
            Some(Blocker::PersonalAccessTokenRejected { .. })
        ));
        assert_eq!(
            (rejected.next_refresh, rejected.requeue_after(at(NOW))),
            (None, None)
        );

        // A rejected refresh token recovered by the PAT: authorized, no rejection left.
        let consent = tokens("2026-11-23T09:15:00Z", "2026-11-01T00:00:00Z", "r");
        let p = plan(&with_pat(observed(Some(consent)), "7"), at(NOW));
        let recovered = p.clone().settle(
            Some(RefreshOutcome::AfterRejection {
                error: "invalid_grant".into(),
                then: Box::new(RefreshOutcome::Obtained(Box::new(new.clone()))),
            }),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert!(recovered.authorization.is_authorized());
        assert_eq!(recovered.rejected_authorization, None);
        assert_eq!(
            recovered.tokens.map(|t| t.obtained_by),
            Some(TokenGrant::PersonalAccessToken)
        );
        // Both rejected: reauthorization required, and the PAT blocked.
        let both = p.settle(
            Some(RefreshOutcome::AfterRejection {
                error: "invalid_grant".into(),
                then: Box::new(RefreshOutcome::PatRejected {
                    error: "invalid_grant".into(),
                }),
            }),
            Some(&settings()),
            "uid-1",
            at(NOW),
        );
        assert!(!both.authorization.is_authorized());
        assert!(both.rejected_authorization.is_some());
        assert!(both.rejected_personal_access_token.is_some());
    }
}
