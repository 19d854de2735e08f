//! The controller: reconciles each `GoToOAuthClient` into a token Secret and a status, and
//! refreshes tokens on schedule.
//!
//! A reconcile is a pipeline, one module per step: [`observe`] reads what is stored,
//! [`plan`] decides (pure, table-tested), [`act`] performs the token request and the writes,
//! and [`status`] derives the status from what was written. [`watches`] runs the controller
//! over the watched namespaces, keeps its cache of clients compact ([`cached`]) and feeds
//! [`index`] (Secret versions, who references what), by which `observe` skips the reads whose
//! answer it already holds; [`memory`] holds the little that cannot live in the API server;
//! [`schedule`] says when tokens refresh and how failures back off.

pub(crate) mod act;
pub(crate) mod admission;
pub(crate) mod alarms;
pub(crate) mod cached;
pub(crate) mod events;
pub(crate) mod first_look;
#[cfg(test)]
pub(crate) mod fixtures;
pub(crate) mod index;
pub(crate) mod memory;
pub(crate) mod observe;
pub(crate) mod pacer;
pub(crate) mod packed;
pub(crate) mod plan;
pub(crate) mod rollout;
pub(crate) mod schedule;
pub(crate) mod status;
pub(crate) mod watches;

use std::{sync::Arc, time::Duration};

use kube::{Client, ResourceExt, runtime::controller::Action};
use tokio::sync::Semaphore;
use tracing::{debug, info, instrument, warn};

pub use observe::ObjectKeys;
pub use watches::run;

use crate::{
    Error, Result,
    clock::Clock,
    consent::{StateKey, index::LinkIndex, random_token},
    goto::GoTo,
    leader::Leadership,
    metrics::{Metrics, ReasonLabels},
    resource::MANAGER,
    validation::Defaults,
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
}

/// Everything reconcile and the HTTP handlers share.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) settings: Settings,
    pub(crate) events: events::Publisher,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) goto: GoTo,
    pub(crate) state_key: StateKey,
    pub(crate) clock: Clock,
    pub(crate) leadership: Leadership,
    pub(crate) refresh_slots: Semaphore,
    /// Turns for due refreshes, earliest expiry first.
    pub(crate) admission: admission::Admission,
    /// When each client is next due, rung into the controller of its scope.
    pub(crate) alarms: Arc<alarms::Alarms>,
    /// Which clients this leadership term has reconciled: refreshes wait for all of them.
    pub(crate) first_look: first_look::FirstLook,
    pub(crate) memory: memory::Memory,
    /// Published authorization links, kept by a watch on every replica.
    pub(crate) links: Arc<LinkIndex>,
    /// The version of every watched Secret, kept by the leader's Secret watch.
    pub(crate) secrets: index::SecretVersions,
    /// Which clients reference which Secret, kept by the leader's client watch.
    pub(crate) references: index::References,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        state_key: StateKey,
        clock: Clock,
        leadership: Leadership,
    ) -> Result<Arc<Context>, crate::goto::OAuthError> {
        Ok(Arc::new(Context {
            events: events::Publisher::new(
                client.clone(),
                MANAGER,
                settings.reporter_instance.clone(),
            ),
            goto: GoTo::new(
                settings.token_timeout,
                settings.token_rate_limit,
                metrics.clone(),
            )?,
            refresh_slots: Semaphore::new(settings.max_concurrent_refreshes.max(1) as usize),
            admission: admission::Admission::new(settings.max_concurrent_refreshes.max(1) as usize),
            alarms: Arc::default(),
            first_look: first_look::FirstLook::default(),
            memory: memory::Memory::default(),
            links: Arc::new(LinkIndex::new(settings.defaults.clone())),
            secrets: index::SecretVersions::default(),
            references: index::References::default(),
            client,
            settings,
            metrics,
            state_key,
            clock,
            leadership,
        }))
    }

    /// Whether `namespace` is one this operator watches (and so serves links for).
    pub(crate) fn watches_namespace(&self, namespace: &str) -> bool {
        self.settings.namespaces.is_empty()
            || self.settings.namespaces.iter().any(|n| n == namespace)
    }

    /// Forgets a client that is gone: its memory and its metric series.
    fn forget(&self, keys: &ObjectKeys) {
        self.memory.forget(&keys.uid);
        self.admission.forget(&keys.uid);
        self.metrics.forget_client(&keys.namespace, &keys.name);
    }
}

/// Reconciles one client: observe → plan → act → status → requeue.
#[instrument(skip_all, fields(namespace = cached.namespace().unwrap_or_default(), name = cached.name_any()))]
pub(crate) async fn reconcile(
    cached: Arc<cached::CachedClient>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let obj = Arc::new(cached.expand()?);
    drop(cached);
    let _timer = ctx.metrics.time_reconcile();
    ctx.metrics.set_api_reachable(true);
    let keys = ObjectKeys::of(&obj)?;
    if obj.metadata.deletion_timestamp.is_some() {
        // The owner reference lets the garbage collector delete the Secret.
        ctx.forget(&keys);
        ctx.first_look.looked_at(&keys.uid);
        return Ok(Action::await_change());
    }
    let observed = match observe::observe(&ctx, obj).await? {
        observe::Snapshot::Current(observed) => observed,
        observe::Snapshot::WaitForWatch => return Ok(Action::requeue(observe::WATCH_DELIVERY)),
        observe::Snapshot::Gone => {
            ctx.first_look.looked_at(&keys.uid);
            return Ok(Action::await_change());
        }
    };
    let now = ctx.clock.now();
    let planned = plan::plan(&observed, now);
    if planned.refresh.is_some()
        && let Some(action) = correct_stale_status(&ctx, &observed, &keys, &planned, now).await?
    {
        ctx.first_look.looked_at(&keys.uid);
        return Ok(action);
    }
    ctx.first_look.looked_at(&keys.uid);
    // A new leader corrects every client's stale status before it refreshes any.
    if planned.refresh.is_some() && !ctx.first_look.refreshes_allowed(std::time::Instant::now()) {
        return Ok(Action::requeue(first_look::RETRY));
    }
    // Due refreshes go earliest expiry first: without a turn the client parks until one is
    // free (see [`admission`]). Tokens waiting to be stored are written first, never parked.
    let turn = match (&planned.refresh, &planned.write) {
        (Some(_), None) => {
            let expires_at = planned.tokens.as_ref().map_or(now, |t| t.expires_at);
            let client = cached::client_ref(&keys.namespace, &keys.name);
            match ctx.admission.enter(&keys.uid, expires_at, client) {
                Some(turn) => Some(turn),
                None => return Ok(Action::requeue(admission::PARKED_RETRY)),
            }
        }
        _ => None,
    };
    let outcome = act::act(&ctx, &observed, &planned).await?;
    drop(turn);
    let refreshed = outcome.is_some();
    let observed_tokens = planned.tokens.clone();
    let mut settled = planned.settle(
        outcome,
        observed.settings.as_ref().ok(),
        &keys.uid,
        ctx.clock.now(),
    );
    // Restarts follow what is stored, so they come after the Secret write and the refresh;
    // with an invalid spec the record stays as it is.
    if let Ok(settings) = &observed.settings {
        let record = ctx.memory.with(&keys.uid, |m| {
            let newest = rollout::newest(settled.rollout.as_ref(), m.rollout.as_deref());
            // Once the status shows this replica's last restart, the memory entry is spent: a
            // stale one must not stand in for a record that was removed with the targets.
            if newest == settled.rollout {
                m.rollout = None;
            }
            newest
        });
        let decision = rollout::decide(
            &settings.rollout,
            record.as_ref(),
            observed_tokens.as_ref(),
            settled.tokens.as_ref(),
            ctx.clock.now(),
        );
        settled.rollout = rollout::reconcile(
            &ctx,
            &observed.obj,
            &settings.rollout,
            decision,
            record.as_ref(),
        )
        .await;
    }
    let link = settled.link.resolve(|| random_token(32));
    let desired = status::desired_status(
        &observed.obj,
        &keys,
        &settled,
        link.as_deref(),
        &ctx.settings.defaults,
        now,
    );
    let events = status::Events::OnTransition(match refreshed {
        true => status::EventAction::Refresh,
        false => status::EventAction::Reconcile,
    });
    match status::apply_status(&ctx, &observed.obj, &keys, desired, events).await {
        Ok(wrote) => debug!(wrote, "reconciled"),
        // The object changed since it was read (a callback, a spec edit): the watch delivers
        // the newer version and the next reconcile writes from it.
        Err(e) if e.is_conflict() => return Ok(Action::requeue(Duration::from_secs(1))),
        Err(e) => return Err(e),
    }
    ctx.memory
        .with(&keys.uid, |m| m.backoff.reconcile_errors = 0);
    // Waiting for time alone: an alarm, not a requeue (see [`alarms`]).
    ctx.alarms
        .set(&keys.namespace, &keys.name, settled.requeue_after(now));
    Ok(Action::await_change())
}

/// How soon a client whose stale status was corrected is reconciled again (to refresh); the
/// watch event of the write usually comes first.
const AFTER_CORRECTION: Duration = Duration::from_millis(500);

/// Writes the status as it stands before the planned refresh when the stored one claims Ready
/// wrongly (see [`status::claims_false_readiness`]); the refresh follows in the next reconcile.
/// `None`: the status tells the truth, go on.
async fn correct_stale_status(
    ctx: &Context,
    observed: &observe::Observed,
    keys: &ObjectKeys,
    planned: &plan::Plan,
    now: jiff::Timestamp,
) -> Result<Option<Action>> {
    let link = planned.link.resolve(|| random_token(32));
    let truthful = status::desired_status(
        &observed.obj,
        keys,
        planned,
        link.as_deref(),
        &ctx.settings.defaults,
        now,
    );
    if !status::claims_false_readiness(observed.obj.status.as_ref(), &truthful) {
        return Ok(None);
    }
    info!("the status claims Ready for an expired access token; correcting it before refreshing");
    let events = status::Events::OnTransition(status::EventAction::Reconcile);
    match status::apply_status(ctx, &observed.obj, keys, truthful, events).await {
        Ok(_) => Ok(Some(Action::requeue(AFTER_CORRECTION))),
        Err(e) if e.is_conflict() => Ok(Some(Action::requeue(Duration::from_secs(1)))),
        Err(e) => Err(e),
    }
}

/// Backs off per object: a bad spec or missing Secret waits for a change; transient errors
/// retry after 1 s doubling to 5 min; unstored tokens retry quickly.
pub(crate) fn error_policy(
    obj: Arc<cached::CachedClient>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: error.metric_label(),
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
        .uid()
        .map(|uid| {
            ctx.memory.with(uid, |m| {
                m.backoff.reconcile_errors = m.backoff.reconcile_errors.saturating_add(1);
                m.backoff.reconcile_errors
            })
        })
        .unwrap_or(1);
    let delay = Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(10)))
        .min(Duration::from_secs(300));
    warn!(error = %error, retry_in = ?delay, "reconcile failed; backing off");
    Action::requeue(delay)
}
