//! What the controller watches and how it runs: the clients (cached without managedFields),
//! Secrets as metadata only (a change to a client secret, a personal access token Secret or a
//! token Secret triggers the clients that reference it), and the manual clock's ticks in tests. One controller per watched
//! namespace, or one for all.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    core::PartialObjectMeta,
    runtime::{Controller, WatchStreamExt, reflector::Store, watcher},
};
use tracing::{debug, info};

use super::{
    Context,
    cached::{CachedClient, ClientRef, cache_event, client_ref},
    error_policy,
    pacer::Pacer,
    reconcile,
};
use crate::resource::GoToOAuthClient;

/// Reconciles at most this many clients at once: a thousand at once would each hold an API
/// connection (and its memory) for nothing; refreshes are rate-limited anyway.
pub(crate) const CONCURRENCY: u16 = 16;
/// How often memory of deleted clients is dropped (the controller is not called for them).
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// How the watches of the clients list: in pages of [`LIST_PAGE`] objects. kube's default of
/// 500 full clients (managedFields included) is megabytes parsed at once, twice (the
/// controller's watch and every replica's own), and the heap grown for it stays fragmented:
/// with 1,000 clients the RSS right after a storm was 24.3 MiB with pages of 500, 22.4 with
/// 250 and 21.7 with 100, but 10,000 clients took 33.6 s to be Ready with 100 (goal 30), 26.0
/// with 250. The Secret watch asks for metadata only and keeps kube's default: with pages of
/// 100 its list took long enough that reconciles read Secrets it had not listed yet (now once
/// a term, see `observe`, but a longer list still delays the term's first refreshes).
pub(crate) fn list_pages() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

/// Objects per LIST page of the client watches.
pub(crate) const LIST_PAGE: u32 = 250;

/// The clients that reference a Secret, as client secret, personal access token or token
/// Secret (from the index the client watch keeps, not a scan of every client).
fn referencing_clients(ctx: &Context, secret: &PartialObjectMeta<Secret>) -> Vec<ClientRef> {
    let (Some(namespace), Some(name)) = (
        secret.metadata.namespace.as_deref(),
        secret.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    ctx.references
        .clients_of(namespace, name)
        .into_iter()
        .map(|client| client_ref(namespace, &client))
        .collect()
}

/// Runs the controller until `shutdown` resolves.
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
    ctx.first_look
        .begin(scopes.len(), std::time::Instant::now());
    // What the previous term's watches saw may be stale now (another replica led meanwhile):
    // nothing is taken from them until this term's watches have listed again.
    ctx.secrets.reset();
    ctx.alarms.reset();
    let runs = scopes
        .into_iter()
        .map(|scope| run_scope(ctx.clone(), scope, shutdown.clone()));
    futures::future::join_all(runs).await;
    // Nothing rings for a replica that no longer leads: the alarms' memory goes now, not at
    // the next term.
    ctx.alarms.reset();
    info!("controller stopped");
}

async fn run_scope(
    ctx: Arc<Context>,
    scope: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let (clients, secrets): (Api<GoToOAuthClient>, Api<PartialObjectMeta<Secret>>) = match &scope {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let (store, writer) = kube::runtime::reflector::store();
    let (refs_ctx, versions_ctx) = (ctx.clone(), ctx.clone());
    let (refs_scope, versions_scope) = (scope.clone(), scope.clone());
    // Every trigger of the watches waits in the pacer (see there); the watch streams only keep
    // the cache and indexes and yield nothing themselves.
    let pacer = Arc::new(Pacer::new(store.clone()));
    let client_pacer = pacer.clone();
    let client_events = watcher(clients, list_pages())
        .default_backoff()
        .inspect(move |event| {
            if let Ok(event) = event {
                refs_ctx.references.follow(refs_scope.as_deref(), event);
            }
        })
        .map_ok(cache_event)
        .reflect(writer)
        .try_filter_map(move |event| {
            match event {
                watcher::Event::InitDone => client_pacer.listed(),
                watcher::Event::Apply(client) => {
                    client_pacer.changed(kube::runtime::reflector::ObjectRef::from_obj(&client))
                }
                // A deleted client has nothing left to reconcile (its memory is pruned).
                watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitApply(_) => {
                }
            }
            futures::future::ready(Ok(None::<CachedClient>))
        });
    // Metadata only: the controller needs a Secret's version, not its data.
    let (mapper_ctx, secret_pacer) = (ctx.clone(), pacer.clone());
    let secret_events = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .inspect(move |event| {
            if let Ok(event) = event {
                versions_ctx
                    .secrets
                    .follow(versions_scope.as_deref(), event);
                if matches!(event, watcher::Event::InitDone) {
                    versions_ctx.first_look.secrets_listed();
                }
            }
        })
        .touched_objects()
        .try_filter_map(move |secret| {
            for client in referencing_clients(&mapper_ctx, &secret) {
                secret_pacer.changed(client);
            }
            futures::future::ready(Ok(None::<PartialObjectMeta<Secret>>))
        });
    let ticks = futures::stream::unfold(ctx.clock.ticks(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    info!(
        namespace = scope.as_deref().unwrap_or("<all>"),
        "controller starting"
    );
    // Parked clients whose turn came (see [`super::admission`]), of this scope.
    let wake_scope = scope.clone();
    let wakes = futures::stream::unfold(ctx.admission.wakes(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(client) => return Some((client, rx)),
                // Lost wakes fall back on the parked client's own requeue.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |client: &ClientRef| {
        futures::future::ready(
            wake_scope
                .as_deref()
                .is_none_or(|ns| client.namespace.as_deref() == Some(ns)),
        )
    });
    let alarms = ctx.alarms.ringing(scope.as_deref());
    let pruner = prune_deleted(ctx.clone(), store.clone(), scope.clone());
    let controller = Controller::for_stream(client_events, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .watches_stream(secret_events, |_| std::iter::empty())
        .reconcile_all_on(ticks)
        .reconcile_on(wakes)
        .reconcile_on(alarms)
        .reconcile_on(pacer.clone().clients())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            pacer.reconciled(&result);
            async move {
                match result {
                    Ok((obj, _)) => debug!(object = %obj, "reconciled"),
                    Err(e) => debug!(error = %e, "reconcile error"),
                }
            }
        });
    // The pruner never ends on its own; the controller's end (shutdown) ends both.
    tokio::select! {
        _ = controller => {}
        _ = pruner => {}
    }
}

/// Once the scope's cache is listed, makes its clients pending for the term's first look;
/// then forgets clients of `scope` that no longer exist, with their metric series.
async fn prune_deleted(ctx: Arc<Context>, store: Store<CachedClient>, scope: Option<String>) {
    if store.wait_until_ready().await.is_err() {
        return futures::future::pending().await;
    }
    ctx.first_look.listed(
        store
            .state()
            .iter()
            .filter_map(|c| c.uid().map(str::to_string)),
    );
    loop {
        tokio::time::sleep(PRUNE_INTERVAL).await;
        let alive: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|c| c.uid().map(str::to_string))
            .collect();
        for (namespace, name) in ctx.memory.prune(scope.as_deref(), &alive) {
            ctx.metrics.forget_client(&namespace, &name);
        }
    }
}
