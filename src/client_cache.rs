//! Every replica's own watch of the `GoToOAuthClient`s, leader or not, feeding what a replica
//! does without leading: the index of published links (any replica serves `/authorize`) and the
//! per-client metrics (any replica answers a scrape, so the alerts work through a fail-over and
//! while no replica leads). One watch per watched namespace, or one for all; read-only: a
//! replica that does not lead writes nothing.

use std::{collections::HashSet, sync::Arc};

use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::warn;

use crate::{metrics::Metrics, resource::GoToOAuthClient};

/// Something kept in step with the watched clients.
pub(crate) trait ClientView: Send + Sync {
    /// A client was added or changed.
    fn apply(&self, obj: &GoToOAuthClient);
    /// A client was deleted.
    fn delete(&self, obj: &GoToOAuthClient);
    /// After a (re)list of `scope` (all namespaces when `None`), whose clients were applied one
    /// by one: `alive` (namespace, name) is every client there; the others are gone.
    fn retain(&self, scope: Option<&str>, alive: &HashSet<(String, String)>);
}

impl ClientView for Metrics {
    fn apply(&self, obj: &GoToOAuthClient) {
        self.observe(obj);
    }

    fn delete(&self, obj: &GoToOAuthClient) {
        if let Some(namespace) = obj.namespace() {
            self.forget_client(&namespace, &obj.name_any());
        }
    }

    fn retain(&self, scope: Option<&str>, alive: &HashSet<(String, String)>) {
        self.retain_clients(scope, alive);
    }
}

/// Keeps `views` in step with the clients of `namespaces` (all when empty) until `stop`.
pub(crate) async fn maintain(
    client: Client,
    namespaces: Vec<String>,
    views: Vec<Arc<dyn ClientView>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let runs = scopes.into_iter().map(|scope| {
        let views = views.clone();
        let api: Api<GoToOAuthClient> = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        async move {
            // A relist is applied object by object, and only the names are kept until its
            // end (a whole list of objects would be a second copy of every client at once).
            let mut listed = HashSet::new();
            let mut events = watcher(api, crate::controller::watches::list_pages())
                .default_backoff()
                .modify(GoToOAuthClient::trim_for_cache)
                .boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Init) => listed.clear(),
                    Ok(watcher::Event::InitApply(obj)) => {
                        views.iter().for_each(|v| v.apply(&obj));
                        if let (Some(ns), Some(name)) = (obj.metadata.namespace, obj.metadata.name)
                        {
                            listed.insert((ns, name));
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let alive = std::mem::take(&mut listed);
                        views
                            .iter()
                            .for_each(|v| v.retain(scope.as_deref(), &alive));
                    }
                    Ok(watcher::Event::Apply(obj)) => views.iter().for_each(|v| v.apply(&obj)),
                    Ok(watcher::Event::Delete(obj)) => views.iter().for_each(|v| v.delete(&obj)),
                    Err(e) => warn!(error = %e, "watching clients failed; retrying"),
                }
            }
        }
    });
    tokio::select! {
        _ = futures::future::join_all(runs) => {}
        _ = stop => {}
    }
}
