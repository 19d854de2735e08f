//! The controller: reconciles each `GoToOAuthClient` into a token Secret and a status, and
//! refreshes tokens on schedule.
//!
//! Reconcile is idempotent and driven by what is stored: it validates the spec, reads the client
//! secret and the token Secret, refreshes when due, writes only what differs (Secret and status by
//! server-side apply under one field manager, each conditional on the resourceVersion it read),
//! publishes an Event only when a condition changes, and requeues itself for the next refresh.
//! The browser-facing endpoint (any replica) uses the same functions to store a new
//! authorization, so the leader simply picks it up from the watch.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use tracing::{debug, info, instrument, warn};

use crate::{
    Error, Result,
    conditions::{self, Authorization, Observation, TokenFacts, reason},
    metrics::Metrics,
    oauth::{ClientCredentials, OAuthError, TokenClient, TokenResponse},
    refresh::{self, Clock, RateLimiter},
    resource::{
        ConsumedState, FORCE_REFRESH_ANNOTATION, GoToOAuthClient, GoToOAuthClientStatus, MANAGER,
        ROTATE_LINK_ANNOTATION,
    },
    secret::{StoredTokens, desired_secret, is_owned_by},
    state::{StateKey, random_token},
    validation::{ClientSettings, Defaults, validate},
};

/// Operator-wide settings the controller and the HTTP endpoints share.
#[derive(Clone, Debug)]
pub struct Settings {
    pub defaults: Defaults,
    pub token_rate_limit: u32,
    pub max_concurrent_refreshes: u32,
    pub token_timeout: Duration,
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Identity used in Events.
    pub reporter_instance: Option<String>,
    /// With leader election: the Lease that must be held, and valid, when a refresh is sent.
    pub lease: Option<LeaseHolder>,
}

/// The Lease a leader holds, as checked before every refresh.
#[derive(Clone, Debug)]
pub struct LeaseHolder {
    pub namespace: String,
    pub name: String,
    pub identity: String,
}

/// Whether the Lease is held by this replica and not expired. The leader-election task only
/// learns of a lost Lease when a renewal fails; a refresh must never rely on that, because
/// two replicas refreshing the same token at once can lose a rotated refresh token.
async fn holds_lease(ctx: &Context, lease: &LeaseHolder) -> Result<bool> {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctx.client.clone(), &lease.namespace);
    let Some(current) = api.get_opt(&lease.name).await? else {
        return Ok(false);
    };
    let Some(spec) = current.spec else {
        return Ok(false);
    };
    let ours = spec.holder_identity.as_deref() == Some(lease.identity.as_str());
    let valid_until = spec.renew_time.map(|t| {
        t.0 + jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)))
    });
    Ok(ours && valid_until.is_some_and(|until| until > Timestamp::now()))
}

/// What one replica remembers about a client between reconciles. It is what lets the operator
/// restore a deleted or hand-edited Secret, and hold rotated tokens until they are stored.
#[derive(Clone, Debug, Default)]
struct ClientMemory {
    /// Namespace and name, to drop the entry and the metric series once the client is gone.
    owner: Option<(String, String)>,
    /// The last tokens this replica wrote or read.
    last_known: Option<StoredTokens>,
    /// `last_known` came from GoTo but is not in the Secret yet: write it before anything else,
    /// and never refresh again until it is stored.
    unstored: bool,
    /// Consecutive transient refresh failures.
    failures: u32,
    /// No refresh before this time (backoff or Retry-After).
    not_before: Option<Timestamp>,
    /// The last transient failure, for the condition message.
    last_failure: Option<String>,
    /// The refresh-requested annotation value already acted on. The status says the same once
    /// written, but a reconcile can run on a cached object before that status write shows up.
    handled_refresh_request: Option<String>,
    /// The resourceVersion of this replica's last status write: a cached object older than
    /// that is about to be replaced by the watch, and writing from it would only conflict.
    written_resource_version: Option<u64>,
    /// Consecutive reconcile errors, for `error_policy`'s backoff.
    reconcile_errors: u32,
}

/// Everything reconcile and the HTTP handlers share.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub token_client: TokenClient,
    pub state_key: StateKey,
    pub clock: Clock,
    pub limiter: RateLimiter,
    refresh_slots: Semaphore,
    memory: Mutex<HashMap<String, ClientMemory>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        state_key: StateKey,
        clock: Clock,
    ) -> Result<Arc<Context>, crate::oauth::OAuthError> {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: settings.reporter_instance.clone(),
        };
        Ok(Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            token_client: TokenClient::new(settings.token_timeout)?,
            limiter: RateLimiter::new(settings.token_rate_limit),
            refresh_slots: Semaphore::new(settings.max_concurrent_refreshes.max(1) as usize),
            memory: Mutex::new(HashMap::new()),
            client,
            settings,
            metrics,
            state_key,
            clock,
        }))
    }

    fn with_memory<T>(&self, uid: &str, f: impl FnOnce(&mut ClientMemory) -> T) -> T {
        let mut all = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(uid.to_string()).or_default())
    }

    fn forget(&self, uid: &str) {
        let mut all = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        all.remove(uid);
    }

    /// Forgets clients of `scope` (a namespace, or all) that no longer exist: the controller is
    /// not called for deleted objects, and their tokens and metric series must not linger.
    fn prune(&self, scope: Option<&str>, alive: &std::collections::HashSet<String>) {
        let gone: Vec<(String, Option<(String, String)>)> = {
            let all = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            all.iter()
                .filter(|(uid, m)| {
                    !alive.contains(*uid)
                        && scope.is_none_or(|ns| {
                            m.owner.as_ref().is_some_and(|(owner_ns, _)| owner_ns == ns)
                        })
                })
                .map(|(uid, m)| (uid.clone(), m.owner.clone()))
                .collect()
        };
        for (uid, owner) in gone {
            self.forget(&uid);
            if let Some((namespace, name)) = owner {
                self.metrics.forget_client(&namespace, &name);
            }
        }
    }
}

/// The resourceVersion as a number. Kubernetes calls it opaque, but every API server in use
/// (etcd-backed) hands out increasing integers; anything else simply disables the comparison.
fn resource_version_number(obj: &GoToOAuthClient) -> Option<u64> {
    obj.metadata.resource_version.as_deref()?.parse().ok()
}

/// Names of an object the API server always sets.
pub struct ObjectKeys {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

pub fn keys(obj: &GoToOAuthClient) -> Result<ObjectKeys> {
    Ok(ObjectKeys {
        namespace: obj
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?,
        name: obj
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey("name"))?,
        uid: obj
            .metadata
            .uid
            .clone()
            .ok_or(Error::MissingObjectKey("uid"))?,
    })
}

/// The client secret, or a message saying what is missing.
pub async fn client_credentials(
    ctx: &Context,
    namespace: &str,
    settings: &ClientSettings,
) -> Result<Result<ClientCredentials, String>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = secrets.get_opt(&settings.client_secret_name).await? else {
        return Ok(Err(format!(
            "Secret {}/{} (spec.clientSecretRef.name) not found",
            namespace, settings.client_secret_name
        )));
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&settings.client_secret_key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .filter(|v| !v.is_empty());
    Ok(match value {
        Some(value) => Ok(ClientCredentials {
            client_id: settings.client_id.clone(),
            client_secret: SecretString::from(value),
        }),
        None => Err(format!(
            "Secret {}/{} has no non-empty key {:?} (spec.clientSecretRef.key)",
            namespace, settings.client_secret_name, settings.client_secret_key
        )),
    })
}

/// The authorization link for a client, with its unguessable token.
pub fn authorization_url(defaults: &Defaults, keys: &ObjectKeys, link_token: &str) -> String {
    defaults.public_endpoint(&format!(
        "authorize/{}/{}/{}",
        keys.namespace, keys.name, link_token
    ))
}

/// The link token inside a published authorization URL.
pub fn link_token(status: Option<&GoToOAuthClientStatus>) -> Option<String> {
    let url = status?.authorization_url.as_deref()?;
    url.rsplit('/')
        .next()
        .filter(|t| t.len() >= 32)
        .map(str::to_string)
}

/// Everything the status is computed from. Both the controller and the callback fill it, so
/// both write the same full status under the same field manager.
pub struct StatusInputs<'a> {
    pub obj: &'a GoToOAuthClient,
    pub keys: &'a ObjectKeys,
    pub observation: Observation,
    pub tokens: Option<&'a StoredTokens>,
    pub next_refresh: Option<Timestamp>,
    /// `Some` when a link can be used (valid spec, client secret present, no conflict).
    pub link_token: Option<String>,
    pub stored_secret_name: Option<String>,
    pub consumed_states: Vec<ConsumedState>,
    pub handled_link_rotation: Option<String>,
    pub handled_refresh_request: Option<String>,
    /// When the consent was given whose refresh token GoTo rejected.
    pub rejected_authorization: Option<Timestamp>,
}

fn time(ts: Timestamp) -> Time {
    Time(ts.round(jiff::Unit::Second).unwrap_or(ts))
}

/// The full desired status.
pub fn desired_status(
    inputs: &StatusInputs,
    defaults: &Defaults,
    now: Timestamp,
) -> GoToOAuthClientStatus {
    let existing = inputs.obj.status.as_ref();
    let existing_conditions = existing
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = inputs.obj.metadata.generation;
    let desired = conditions::desired_conditions(&inputs.observation, now);
    let tokens = inputs.tokens;
    GoToOAuthClientStatus {
        conditions: conditions::merge_conditions(existing_conditions, &desired, generation, now),
        authorization_url: inputs
            .link_token
            .as_deref()
            .map(|t| authorization_url(defaults, inputs.keys, t)),
        access_token_expires_at: tokens.map(|t| time(t.expires_at)),
        last_refresh_time: tokens.map(|t| time(t.issued_at)),
        next_refresh_time: inputs.next_refresh.map(time),
        principal: tokens.and_then(|t| t.principal.clone()),
        account_key: tokens.and_then(|t| t.account_key.clone()),
        organizer_key: tokens.and_then(|t| t.organizer_key.clone()),
        secret_name: inputs.stored_secret_name.clone(),
        handled_link_rotation: inputs.handled_link_rotation.clone(),
        handled_refresh_request: inputs.handled_refresh_request.clone(),
        rejected_authorization: inputs.rejected_authorization.map(time),
        consumed_states: inputs
            .consumed_states
            .iter()
            .filter(|c| c.expires_at > now.as_second())
            .cloned()
            .collect(),
        observed_generation: generation,
    }
}

/// Writes the status when it differs from the object's, conditional on the object's
/// resourceVersion, and publishes one Event when a condition changed. Returns whether it wrote.
pub async fn apply_status(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    status: GoToOAuthClientStatus,
) -> Result<bool> {
    let current = obj.status.clone().unwrap_or_default();
    if current == status {
        return Ok(false);
    }
    let written = write_status(ctx, keys, obj.resource_version(), &status).await?;
    let version = resource_version_number(&written);
    ctx.with_memory(&keys.uid, |m| m.written_resource_version = version);

    // Events and metrics follow the conditions as written.
    if let Some(condition) = conditions::transition(&current.conditions, &status.conditions) {
        let normal = matches!(
            condition.reason.as_str(),
            reason::AUTHORIZED | reason::AWAITING_AUTHORIZATION
        );
        publish(ctx, obj, &condition.reason, &condition.message, normal).await;
    }
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::READY && c.status == "True");
    let labels = Metrics::client(&keys.namespace, &keys.name);
    ctx.metrics
        .client_ready
        .get_or_create(&labels)
        .set(i64::from(ready));
    match &status.access_token_expires_at {
        Some(t) => {
            ctx.metrics
                .token_expiry
                .get_or_create(&labels)
                .set(t.0.as_second());
        }
        None => {
            ctx.metrics.token_expiry.remove(&labels);
        }
    }
    Ok(true)
}

/// Publishes an Event; failures are logged, never fatal (events are best effort).
pub async fn publish(ctx: &Context, obj: &GoToOAuthClient, reason: &str, note: &str, normal: bool) {
    let event = Event {
        type_: if normal {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

/// Writes the token Secret. An existing Secret is updated only at the resourceVersion that was
/// read (and only when this resource owns it); an absent one is created without force, so a
/// Secret someone else created meanwhile is reported as a conflict, never taken over.
pub async fn write_secret(
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

/// The observation of a client's tokens and their health, shared by reconcile and callback.
fn authorization_state(
    obj: &GoToOAuthClient,
    settings: Option<&ClientSettings>,
    tokens: Option<&StoredTokens>,
) -> Authorization {
    let current = obj.condition(conditions::AUTHORIZED);
    match tokens {
        None => match current {
            Some(c) if conditions::CONSENT_FAILURE_REASONS.contains(&c.reason.as_str()) => {
                let reason = if c.reason == reason::ACCESS_DENIED {
                    reason::ACCESS_DENIED
                } else {
                    reason::AUTHORIZATION_FAILED
                };
                Authorization::Failed {
                    reason,
                    message: c.message.clone(),
                }
            }
            _ => Authorization::Awaiting,
        },
        Some(tokens) => {
            if let Some(settings) = settings
                && !tokens.issued_to(settings)
            {
                return Authorization::ReauthorizationRequired {
                    message: format!(
                        "the stored tokens were issued to client {} at {}; the spec now names client {} at {}",
                        tokens.client_id, tokens.token_url, settings.client_id, settings.token_url
                    ),
                };
            }
            let rejected = obj
                .status
                .as_ref()
                .and_then(|s| s.rejected_authorization.as_ref())
                .is_some_and(|t| t.0.as_second() == tokens.authorized_at.as_second());
            match current {
                // Sticky: a rejected refresh token stays rejected until a new consent replaces it.
                Some(c) if rejected && c.reason == reason::REAUTHORIZATION_REQUIRED => {
                    Authorization::ReauthorizationRequired {
                        message: c
                            .message
                            .split("; send the new")
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    }
                }
                _ => Authorization::Authorized {
                    principal: tokens.principal.clone(),
                },
            }
        }
    }
}

/// Reconciles one client. See the module docs for the order of steps.
#[instrument(skip_all, fields(namespace = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
pub async fn reconcile(obj: Arc<GoToOAuthClient>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    ctx.metrics.set_api_reachable(true);
    let result = reconcile_inner(&obj, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok()
        && let Some(uid) = obj.metadata.uid.as_deref()
    {
        ctx.with_memory(uid, |m| m.reconcile_errors = 0);
    }
    result
}

async fn reconcile_inner(obj: &GoToOAuthClient, ctx: &Context) -> Result<Action> {
    let keys = keys(obj)?;
    if obj.metadata.deletion_timestamp.is_some() {
        // The owner reference lets the garbage collector delete the Secret.
        ctx.forget(&keys.uid);
        ctx.metrics.forget_client(&keys.namespace, &keys.name);
        return Ok(Action::await_change());
    }
    let written = ctx.with_memory(&keys.uid, |m| {
        m.owner = Some((keys.namespace.clone(), keys.name.clone()));
        m.written_resource_version
    });
    if let (Some(seen), Some(written)) = (resource_version_number(obj), written)
        && seen < written
    {
        // Triggered (say, by our own Secret write) before the watch delivered our own status
        // write: the newer object is on its way and reconciles then.
        debug!(
            seen,
            written, "cached object predates our last write; waiting for the watch"
        );
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let now = ctx.clock.now();
    let status = obj.status.clone().unwrap_or_default();
    let annotations = obj.annotations();
    let rotate_request = annotations.get(ROTATE_LINK_ANNOTATION).cloned();
    let refresh_request = annotations.get(FORCE_REFRESH_ANNOTATION).cloned();

    let settings = validate(obj, &ctx.settings.defaults);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);

    // Read what is stored: the token Secret (and, after a secretName change, the old one).
    let target_name = obj.target_secret_name();
    let target = secrets.get_opt(&target_name).await?;
    let previous_name = status.secret_name.clone().filter(|n| *n != target_name);
    let previous_secret = match &previous_name {
        Some(name) => secrets.get_opt(name).await?.filter(|s| is_owned_by(s, obj)),
        None => None,
    };
    let conflict = target.as_ref().is_some_and(|s| !is_owned_by(s, obj));
    let from_secret = target
        .as_ref()
        .filter(|_| !conflict)
        .and_then(StoredTokens::from_secret)
        .or_else(|| previous_secret.as_ref().and_then(StoredTokens::from_secret));

    // Decide which tokens are current: pending unstored ones, newer ones from the Secret (a
    // callback on any replica), or the remembered ones when the Secret lost them.
    let memory = ctx.with_memory(&keys.uid, |m| m.clone());
    let (mut tokens, mut must_write) = match (&memory.last_known, &from_secret) {
        (Some(known), Some(stored)) if memory.unstored => {
            if stored.authorized_at > known.authorized_at {
                (Some(stored.clone()), false) // a newer consent superseded what we held
            } else {
                (Some(known.clone()), true)
            }
        }
        (Some(_), None) if conflict => (None, false),
        (Some(known), None) => (Some(known.clone()), true),
        (Some(known), Some(stored)) => {
            let newer =
                stored.issued_at > known.issued_at || stored.authorized_at > known.authorized_at;
            if stored == known || newer {
                (Some(stored.clone()), false)
            } else {
                // Edited by hand or rolled back: restore what the operator last stored.
                (Some(known.clone()), true)
            }
        }
        (None, stored) => (stored.clone(), false),
    };
    if previous_secret.is_some() && !conflict {
        must_write = true; // moving to the new secretName
    }

    let mut blocker: Option<(&'static str, String)> = None;
    let mut refresh_failure = memory.last_failure.clone();
    let mut handled_refresh_request = status.handled_refresh_request.clone();
    if refresh_request.is_some() && memory.handled_refresh_request == refresh_request {
        handled_refresh_request = refresh_request.clone();
    }
    let mut link = link_token(Some(&status));
    let mut handled_link_rotation = status.handled_link_rotation.clone();
    let mut next_refresh = None;
    let mut stored_secret_name = status.secret_name.clone();

    let mut authorization = authorization_state(obj, settings.as_ref().ok(), tokens.as_ref());
    // Kept only while the stored tokens are those of the rejected consent.
    let mut rejected_authorization =
        status
            .rejected_authorization
            .as_ref()
            .map(|t| t.0)
            .filter(|at| {
                tokens
                    .as_ref()
                    .is_some_and(|t| t.authorized_at.as_second() == at.as_second())
            });
    match &settings {
        Err(message) => blocker = Some((reason::INVALID_SPEC, message.clone())),
        Ok(settings) => {
            let credentials = client_credentials(ctx, &keys.namespace, settings).await?;
            if conflict {
                blocker = Some((
                    reason::SECRET_CONFLICT,
                    format!(
                        "Secret {}/{} exists and is not owned by this GoToOAuthClient; delete it or choose another spec.secretName",
                        keys.namespace, target_name
                    ),
                ));
            } else if let Err(message) = &credentials {
                blocker = Some((reason::CLIENT_SECRET_MISSING, message.clone()));
            }

            if !conflict && let Some(current) = tokens.clone() {
                if must_write {
                    let written = write_secret(ctx, obj, settings, &current, target.as_ref()).await;
                    match written {
                        Ok(_) => {
                            ctx.with_memory(&keys.uid, |m| {
                                m.last_known = Some(current.clone());
                                m.unstored = false;
                            });
                            if let Some(old) = &previous_name {
                                delete_owned_secret(ctx, obj, &keys.namespace, old).await?;
                            }
                            info!("token Secret written");
                        }
                        Err(e) => return Err(Error::TokensUnstored(e.to_string())),
                    }
                } else {
                    ctx.with_memory(&keys.uid, |m| m.last_known = Some(current.clone()));
                }
                stored_secret_name = Some(settings.secret_name.clone());

                let refreshable = matches!(authorization, Authorization::Authorized { .. });
                if refreshable && let Ok(credentials) = &credentials {
                    let due =
                        refresh::next_refresh_at(&current, settings.refresh_before, &keys.uid);
                    let forced =
                        refresh_request.is_some() && refresh_request != handled_refresh_request;
                    let not_before = memory.not_before.unwrap_or(now);
                    let mut when = due.max(not_before);
                    if forced {
                        when = not_before;
                    }
                    if when <= now {
                        match refresh_once(
                            ctx,
                            obj,
                            &keys,
                            settings,
                            credentials,
                            &current,
                            target.as_ref(),
                        )
                        .await?
                        {
                            RefreshOutcome::Refreshed(new) => {
                                tokens = Some((*new).clone());
                                refresh_failure = None;
                                handled_refresh_request = refresh_request.clone();
                                ctx.with_memory(&keys.uid, |m| {
                                    m.handled_refresh_request = refresh_request.clone();
                                });
                                when = refresh::next_refresh_at(
                                    &new,
                                    settings.refresh_before,
                                    &keys.uid,
                                );
                            }
                            RefreshOutcome::NotLeader => {
                                // The controller stops as soon as the loss is noticed; until
                                // then, look again shortly.
                                when = now + jiff::SignedDuration::from_secs(2);
                            }
                            RefreshOutcome::Failed { message, retry_at } => {
                                refresh_failure = Some(message);
                                when = retry_at;
                            }
                            RefreshOutcome::Rejected { message } => {
                                authorization = Authorization::ReauthorizationRequired { message };
                                rejected_authorization = Some(current.authorized_at);
                                // A fresh link for the re-authorization.
                                link = None;
                                handled_refresh_request = refresh_request.clone();
                                ctx.with_memory(&keys.uid, |m| {
                                    m.handled_refresh_request = refresh_request.clone();
                                });
                            }
                        }
                    }
                    if matches!(authorization, Authorization::Authorized { .. }) {
                        next_refresh = Some(when);
                    }
                }
            }
        }
    }

    // The link exists while it can work; a changed rotate annotation replaces it.
    let link_usable = settings.is_ok()
        && !matches!(blocker, Some((r, _)) if r == reason::CLIENT_SECRET_MISSING || r == reason::SECRET_CONFLICT);
    if rotate_request.is_some() && rotate_request != handled_link_rotation {
        link = None;
        handled_link_rotation = rotate_request.clone();
    }
    let link_token = if link_usable {
        Some(link.unwrap_or_else(|| random_token(32)))
    } else {
        None
    };
    if tokens.is_none() {
        stored_secret_name = None;
    }

    let observation = Observation {
        blocker,
        tokens: tokens.as_ref().map(|t| TokenFacts {
            expires_at: t.expires_at,
        }),
        authorization,
        refresh_failure,
    };
    let inputs = StatusInputs {
        obj,
        keys: &keys,
        observation,
        tokens: tokens.as_ref(),
        next_refresh,
        link_token,
        stored_secret_name,
        consumed_states: status.consumed_states.clone(),
        handled_link_rotation,
        handled_refresh_request,
        rejected_authorization,
    };
    let desired = desired_status(&inputs, &ctx.settings.defaults, now);
    let wrote = match apply_status(ctx, obj, &keys, desired.clone()).await {
        Ok(wrote) => wrote,
        // The object changed since this reconcile read it (a callback, a spec edit): the watch
        // delivers the newer version and the next reconcile writes from it.
        Err(e) if e.is_conflict() => {
            debug!("status changed meanwhile; reconciling again");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Err(e) => return Err(e),
    };
    debug!(wrote, "reconciled");

    // Wake up for the next thing that changes on its own: a refresh, an expiry, a state entry
    // running out. Everything else arrives through the watches.
    let mut wake = Vec::new();
    if let Some(at) = next_refresh {
        wake.push(at);
    }
    if let Some(t) = &tokens
        && t.expires_at > now
    {
        wake.push(t.expires_at);
    }
    if let Some(c) = desired.consumed_states.iter().map(|c| c.expires_at).min()
        && let Ok(at) = Timestamp::from_second(c)
    {
        wake.push(at);
    }
    Ok(match wake.into_iter().min() {
        Some(at) => Action::requeue(ctx.clock.until(at).max(Duration::from_millis(500))),
        None => Action::await_change(),
    })
}

async fn delete_owned_secret(
    ctx: &Context,
    obj: &GoToOAuthClient,
    namespace: &str,
    name: &str,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    if let Some(secret) = api.get_opt(name).await?
        && is_owned_by(&secret, obj)
    {
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
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
    }
    Ok(())
}

/// How long a refreshed token's Secret write is retried inside the refresh itself. GoTo may
/// have invalidated the old refresh token already, so the new one must reach the Secret before
/// this replica can stop (shutdown, lost leadership); past this, the reconcile retries keep it.
const STORE_RETRY_WINDOW: Duration = Duration::from_secs(10);

/// Writes refreshed tokens, re-reading the Secret after a conflict and retrying transient
/// failures for up to [`STORE_RETRY_WINDOW`].
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
    let deadline = tokio::time::Instant::now() + STORE_RETRY_WINDOW;
    let mut current = target.cloned();
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match write_secret(ctx, obj, settings, tokens, current.as_ref()).await {
            Ok(_) => return Ok(()),
            Err(e @ Error::SecretConflict(_)) => return Err(e),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(error);
        }
        debug!(error = %error, "storing refreshed tokens failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        if let Ok(latest) = api.get_opt(&settings.secret_name).await {
            if let Some(stored) = latest.as_ref().and_then(StoredTokens::from_secret)
                && stored.authorized_at > tokens.authorized_at
            {
                // A newer consent replaced these tokens meanwhile; nothing to store.
                return Ok(());
            }
            current = latest;
        }
    }
}

enum RefreshOutcome {
    Refreshed(Box<StoredTokens>),
    Failed {
        message: String,
        retry_at: Timestamp,
    },
    Rejected {
        message: String,
    },
    /// This replica no longer holds the Lease: nothing was sent.
    NotLeader,
}

/// One refresh: rate-limited, bounded in concurrency, and storing a rotated refresh token
/// before anything else can happen to it.
async fn refresh_once(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    settings: &ClientSettings,
    credentials: &ClientCredentials,
    current: &StoredTokens,
    target: Option<&Secret>,
) -> Result<RefreshOutcome> {
    let _slot = ctx
        .refresh_slots
        .acquire()
        .await
        .map_err(|_| Error::TokensUnstored("shutting down".into()))?;
    ctx.limiter.acquire().await;
    if let Some(lease) = &ctx.settings.lease
        && !holds_lease(ctx, lease).await?
    {
        warn!("not holding the leader Lease; refresh not sent");
        return Ok(RefreshOutcome::NotLeader);
    }
    let started = std::time::Instant::now();
    let response = ctx
        .token_client
        .refresh(
            settings.token_url.as_str(),
            credentials,
            current.refresh_token.expose_secret(),
        )
        .await;
    observe_token_request(ctx, "refresh_token", &response, started);
    let now = ctx.clock.now();
    match response {
        Ok(response) => {
            let new = StoredTokens::from_response(&response, Some(current), settings, now)
                .map_err(|e| Error::TokensUnstored(e.to_string()))?;
            // Held in memory first: if the write fails, the next reconcile writes it again and
            // sends no second refresh.
            ctx.with_memory(&keys.uid, |m| {
                m.last_known = Some(new.clone());
                m.unstored = true;
                m.failures = 0;
                m.not_before = None;
                m.last_failure = None;
            });
            ctx.metrics
                .count_refresh(&keys.namespace, &keys.name, "success");
            match store_refreshed(ctx, obj, settings, &new, target).await {
                Ok(_) => {
                    ctx.with_memory(&keys.uid, |m| m.unstored = false);
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
            ctx.metrics
                .count_refresh(&keys.namespace, &keys.name, e.reason());
            ctx.with_memory(&keys.uid, |m| {
                m.failures = 0;
                m.not_before = None;
                m.last_failure = None;
            });
            warn!(error = %e, "refresh token rejected; a new authorization is required");
            Ok(RefreshOutcome::Rejected {
                message: format!("GoTo rejected the refresh token ({e})"),
            })
        }
        Err(e) => {
            let retry_after = match &e {
                OAuthError::RateLimited { retry_after } => *retry_after,
                _ => None,
            };
            let result = if matches!(e, OAuthError::RateLimited { .. }) {
                "rate_limited"
            } else {
                "transient_error"
            };
            ctx.metrics
                .count_refresh(&keys.namespace, &keys.name, result);
            let (attempt, retry_at) = ctx.with_memory(&keys.uid, |m| {
                m.failures += 1;
                let delay = refresh::backoff(m.failures, retry_after);
                let at = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
                m.not_before = Some(at);
                m.last_failure = Some(e.to_string());
                (m.failures, at)
            });
            warn!(error = %e, attempt, retry_at = %retry_at, "refresh failed; will retry");
            Ok(RefreshOutcome::Failed {
                message: e.to_string(),
                retry_at,
            })
        }
    }
}

/// Records a token-endpoint request in the duration histogram.
pub fn observe_token_request(
    ctx: &Context,
    grant_type: &str,
    response: &std::result::Result<TokenResponse, OAuthError>,
    started: std::time::Instant,
) {
    let result = match response {
        Ok(_) => "success",
        Err(e) => e.reason(),
    };
    ctx.metrics
        .token_request_duration
        .get_or_create(&crate::metrics::TokenRequestLabels {
            grant_type: grant_type.into(),
            result: result.into(),
        })
        .observe(started.elapsed().as_secs_f64());
}

/// Backs off per object: a bad spec or missing Secret waits for a change; transient errors
/// retry after 1 s doubling to 5 min; unstored tokens retry quickly.
pub fn error_policy(obj: Arc<GoToOAuthClient>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ReasonLabels {
            reason: error.metric_label().into(),
        })
        .inc();
    if let Error::Kube(kube::Error::Api(s)) = error
        && s.code >= 500
    {
        ctx.metrics.set_api_reachable(false);
    }
    if !error.is_transient() {
        warn!(error = %error, "reconcile failed; waiting for a change");
        return Action::await_change();
    }
    let attempts = obj
        .metadata
        .uid
        .as_deref()
        .map(|uid| {
            ctx.with_memory(uid, |m| {
                m.reconcile_errors = m.reconcile_errors.saturating_add(1);
                m.reconcile_errors
            })
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(10)))
        .min(Duration::from_secs(300));
    warn!(error = %error, retry_in = ?delay, "reconcile failed; backing off");
    Action::requeue(delay)
}

/// The CRs that reference a Secret, as client secret or as token Secret.
fn referencing_clients(
    store: &Store<GoToOAuthClient>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<GoToOAuthClient>> {
    let (Some(namespace), Some(name)) = (
        secret.metadata.namespace.as_deref(),
        secret.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|c| c.metadata.namespace.as_deref() == Some(namespace))
        .filter(|c| {
            c.spec.client_secret_ref.name == name
                || c.target_secret_name() == name
                || c.status.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(name)
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

/// Runs the controller (one per watched namespace, or one for all) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let scopes: Vec<Option<String>> = if ctx.settings.namespaces.is_empty() {
        vec![None]
    } else {
        ctx.settings.namespaces.iter().cloned().map(Some).collect()
    };
    let runs = scopes.into_iter().map(|scope| {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        async move {
            let (clients, secrets): (Api<GoToOAuthClient>, Api<PartialObjectMeta<Secret>>) =
                match &scope {
                    Some(ns) => (
                        Api::namespaced(ctx.client.clone(), ns),
                        Api::namespaced(ctx.client.clone(), ns),
                    ),
                    None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
                };
            // Bounded concurrency: a thousand clients reconciled at once would each hold an API
            // connection (and its memory) for nothing; refreshes are rate-limited anyway.
            // The cache keeps every client; managedFields are most of each object's size and
            // the operator never reads them.
            let (store, writer) = kube::runtime::reflector::store();
            let client_events = watcher(clients, watcher::Config::default())
                .default_backoff()
                .modify(|client: &mut GoToOAuthClient| client.managed_fields_mut().clear())
                .reflect(writer)
                .touched_objects();
            let controller = Controller::for_stream(client_events, store.clone())
                .with_config(kube::runtime::controller::Config::default().concurrency(16));
            // Metadata only: the controller needs to know that a Secret changed, not its data.
            let secret_events = watcher(secrets, watcher::Config::default())
                .default_backoff()
                .touched_objects();
            let ticks = futures::stream::unfold(ctx.clock.ticks(), |mut rx| async move {
                rx.changed().await.ok()?;
                Some(((), rx))
            });
            info!(
                namespace = scope.as_deref().unwrap_or("<all>"),
                "controller starting"
            );
            let pruner = {
                let ctx = ctx.clone();
                let store = store.clone();
                let scope = scope.clone();
                async move {
                    if store.wait_until_ready().await.is_err() {
                        futures::future::pending::<()>().await;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        let alive = store
                            .state()
                            .iter()
                            .filter_map(|c| c.metadata.uid.clone())
                            .collect();
                        ctx.prune(scope.as_deref(), &alive);
                    }
                }
            };
            let controller = controller
                .watches_stream(secret_events, move |secret| {
                    referencing_clients(&store, &secret)
                })
                .reconcile_all_on(ticks)
                .graceful_shutdown_on(shutdown)
                .run(reconcile, error_policy, ctx.clone())
                .for_each(|result| async move {
                    match result {
                        Ok((obj, _)) => debug!(object = %obj, "reconciled"),
                        Err(e) => debug!(error = %e, "reconcile error"),
                    }
                });
            // The pruner never ends on its own; the controller's end (shutdown) ends both.
            tokio::select! {
                _ = controller => {}
                _ = pruner => {}
            }
        }
    });
    futures::future::join_all(runs).await;
    info!("controller stopped");
}

/// Writes a full status by server-side apply, conditional on `resource_version`.
pub async fn write_status(
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

/// The outcome of claiming an authorization attempt.
pub enum Claim {
    /// This replica claimed the nonce; the object as it is after the claim.
    Claimed(Box<GoToOAuthClient>),
    /// The nonce was used before: a replayed callback.
    Replayed,
    /// The resource is gone or was replaced (another uid).
    Gone,
}

/// Records an authorization attempt's nonce as consumed, exactly once across all replicas: the
/// status write is conditional on the resourceVersion read, so two concurrent claims cannot both
/// succeed.
pub async fn claim_state(
    ctx: &Context,
    keys: &ObjectKeys,
    nonce: &str,
    expires_at: i64,
) -> Result<Claim> {
    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let now = ctx.clock.now().as_second();
    for _ in 0..5 {
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
        match write_status(ctx, keys, obj.resource_version(), &status).await {
            Ok(updated) => return Ok(Claim::Claimed(Box::new(updated))),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Kube(kube::Error::Api(Box::new(
        kube::core::Status::failure(
            "could not record the authorization attempt: the resource kept changing",
            "Conflict",
        )
        .with_code(409),
    ))))
}

/// The status after a consent attempt failed: `Authorized` carries the failure only while no
/// tokens are stored (a failed attempt never spoils a working client); an Event always.
pub async fn record_consent_failure(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    failure_reason: &'static str,
    message: &str,
) -> Result<()> {
    let has_tokens = obj
        .status
        .as_ref()
        .is_some_and(|s| s.access_token_expires_at.is_some());
    if !has_tokens {
        let mut status = obj.status.clone().unwrap_or_default();
        let now = ctx.clock.now();
        let authorized = conditions::DesiredCondition {
            type_: conditions::AUTHORIZED,
            status: "False",
            reason: failure_reason,
            message: message.to_string(),
        };
        // Ready mirrors the failure while nothing is stored; same order as the controller's.
        let ready = conditions::DesiredCondition {
            type_: conditions::READY,
            ..authorized.clone()
        };
        status.conditions = conditions::merge_conditions(
            &status.conditions,
            &[ready, authorized],
            obj.metadata.generation,
            now,
        );
        match write_status(ctx, keys, obj.resource_version(), &status).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
    }
    publish(ctx, obj, failure_reason, message, false).await;
    Ok(())
}

/// What a successful code exchange stored.
pub struct Authorized {
    pub tokens: StoredTokens,
    pub secret_name: String,
}

/// Stores a new authorization: the Secret first, then the status (Authorized, a fresh link,
/// expiry, next refresh), so a crash in between loses nothing the leader cannot rebuild.
pub async fn complete_authorization(
    ctx: &Context,
    obj: &GoToOAuthClient,
    keys: &ObjectKeys,
    settings: &ClientSettings,
    response: &TokenResponse,
) -> Result<Authorized> {
    let now = ctx.clock.now();
    let tokens = StoredTokens::from_response(response, None, settings, now)
        .map_err(|e| Error::OAuth(OAuthError::MalformedResponse(e.to_string())))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let mut written = false;
    for _ in 0..3 {
        let current = secrets.get_opt(&settings.secret_name).await?;
        match write_secret(ctx, obj, settings, &tokens, current.as_ref()).await {
            Ok(_) => {
                written = true;
                break;
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    if !written {
        return Err(Error::TokensUnstored(
            "the token Secret kept changing".into(),
        ));
    }
    ctx.with_memory(&keys.uid, |m| {
        m.last_known = Some(tokens.clone());
        m.unstored = false;
        m.failures = 0;
        m.not_before = None;
        m.last_failure = None;
    });

    let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    for _ in 0..5 {
        let Some(latest) = api.get_opt(&keys.name).await? else {
            break;
        };
        let status = latest.status.clone().unwrap_or_default();
        let observation = Observation {
            blocker: None,
            tokens: Some(TokenFacts {
                expires_at: tokens.expires_at,
            }),
            authorization: Authorization::Authorized {
                principal: tokens.principal.clone(),
            },
            refresh_failure: None,
        };
        let inputs = StatusInputs {
            obj: &latest,
            keys,
            observation,
            tokens: Some(&tokens),
            next_refresh: Some(refresh::next_refresh_at(
                &tokens,
                settings.refresh_before,
                &keys.uid,
            )),
            // The used link is spent; the next re-authorization gets a fresh one.
            link_token: Some(random_token(32)),
            stored_secret_name: Some(settings.secret_name.clone()),
            consumed_states: status.consumed_states.clone(),
            handled_link_rotation: status.handled_link_rotation.clone(),
            handled_refresh_request: latest.annotations().get(FORCE_REFRESH_ANNOTATION).cloned(),
            rejected_authorization: None,
        };
        let desired = desired_status(&inputs, &ctx.settings.defaults, now);
        match apply_status(ctx, &latest, keys, desired).await {
            Ok(_) => break,
            Err(e) if e.is_conflict() => continue,
            Err(e) => {
                // The Secret holds the tokens; the leader's reconcile derives the status from it.
                warn!(error = %e, "authorization stored, status not updated yet");
                break;
            }
        }
    }
    info!(namespace = %keys.namespace, name = %keys.name, "authorization stored");
    Ok(Authorized {
        tokens,
        secret_name: settings.secret_name.clone(),
    })
}
