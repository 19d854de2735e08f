//! Start-up: the one path from a configuration to a running operator, used by `main`, the e2e
//! harness, the demo and the benchmark alike.
//!
//! [`Operator::start`] loads the shared state key, builds the one [`Context`], and runs the
//! authorize/callback server, the operations server, the API probe and the controller (under
//! leader election when configured) until the shutdown signal, then waits for all of them.

use std::{sync::Arc, time::Duration};

use kube::Client;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};
use url::Url;

use crate::{
    client_cache::{self, ClientView},
    clock::Clock,
    consent::{StateKeyError, load_or_create_key},
    controller::{self, Context, Settings},
    goto::OAuthError,
    leader::{self, Leadership, LeaseSettings},
    metrics::{self, Metrics},
    validation::{AllowedHost, Defaults},
    web::{self, server::WebLimits},
};

/// How an operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// External base URL of the authorize/callback endpoint.
    pub public_url: Url,
    /// Operator-wide GoTo endpoints.
    pub authorize_url: Url,
    pub token_url: Url,
    /// Hosts a spec's endpoints may name besides those of `authorize_url` and `token_url`.
    pub allowed_endpoint_hosts: Vec<AllowedHost>,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Home of the Lease and the state-key Secret.
    pub operator_namespace: String,
    pub state_key_secret: String,
    /// This replica's name in Events and in the Lease.
    pub identity: String,
    /// `Some`: elect a leader through this Lease; `None`: always lead.
    pub lease: Option<LeaseTiming>,
    pub token_rate_limit: u32,
    pub max_concurrent_refreshes: u32,
    pub token_timeout: Duration,
    pub clock: Clock,
    /// Bounds on the connections and requests of both listeners.
    pub web_limits: WebLimits,
}

/// The Lease of leader election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    pub name: String,
    pub timing: leader::Timing,
}

/// Sockets to serve on, bound by the caller (so tests can bind port 0 and know the port).
#[derive(Debug)]
pub struct Listeners {
    /// The browser-facing authorize/callback endpoint.
    pub web: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics`; `None` to serve none.
    pub ops: Option<TcpListener>,
}

/// Why the operator could not start.
#[derive(thiserror::Error, Debug)]
pub enum StartError {
    #[error("cannot load or create the state key Secret: {0}")]
    StateKey(#[from] StateKeyError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] OAuthError),
}

/// A running operator.
pub struct Operator {
    pub metrics: Arc<Metrics>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

/// How often `/readyz` re-checks that the API server answers.
const API_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Pause before campaigning again after joining the election failed (the API server did not
/// answer the Lease request) or the lease manager stopped on its own.
const ELECTION_RETRY: Duration = Duration::from_secs(2);

impl Operator {
    /// Starts everything; it runs until `shutdown` turns `true`.
    pub async fn start(
        config: Config,
        client: Client,
        listeners: Listeners,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Operator, StartError> {
        let state_key = load_or_create_key(
            client.clone(),
            &config.operator_namespace,
            &config.state_key_secret,
        )
        .await?;
        let metrics = Arc::new(Metrics::new(config.clock.clone()));
        metrics.set_api_reachable(true);
        let lease = config.lease.as_ref().map(|timing| LeaseSettings {
            namespace: config.operator_namespace.clone(),
            name: timing.name.clone(),
            identity: config.identity.clone(),
            timing: timing.timing,
        });
        let leadership = match &lease {
            Some(lease) => Leadership::elected(client.clone(), lease.clone()),
            None => Leadership::always(),
        };
        let settings = Settings {
            defaults: Defaults {
                public_url: config.public_url.clone(),
                authorize_url: config.authorize_url.clone(),
                token_url: config.token_url.clone(),
                allowed_hosts: config.allowed_endpoint_hosts.clone(),
            },
            token_rate_limit: config.token_rate_limit,
            max_concurrent_refreshes: config.max_concurrent_refreshes,
            token_timeout: config.token_timeout,
            namespaces: config.namespaces.clone(),
            reporter_instance: Some(config.identity.clone()),
        };
        let ctx = Context::new(
            client.clone(),
            settings,
            metrics.clone(),
            state_key,
            config.clock.clone(),
            leadership,
        )?;

        // Every replica watches the clients, leader or not: any of them may serve a link, and
        // every one exports the per-client series from what it sees.
        let views: Vec<Arc<dyn ClientView>> = vec![ctx.links.clone(), metrics.clone()];
        let index = client_cache::maintain(
            client.clone(),
            config.namespaces.clone(),
            views,
            signalled(shutdown.clone(), true),
        );
        let mut tasks = vec![
            (
                "client watch",
                tokio::spawn(async move {
                    index.await;
                    Ok(())
                }),
            ),
            (
                "authorize endpoint",
                tokio::spawn(serve(
                    listeners.web,
                    web::router(ctx.clone()),
                    config.web_limits.clone(),
                    shutdown.clone(),
                )),
            ),
        ];
        if let Some(ops) = listeners.ops {
            tasks.push((
                "metrics endpoint",
                tokio::spawn(serve(
                    ops,
                    metrics::ops_router(metrics.clone()),
                    config.web_limits.clone(),
                    shutdown.clone(),
                )),
            ));
        }
        tasks.push((
            "API probe",
            tokio::spawn(api_probe(client.clone(), metrics.clone(), shutdown.clone())),
        ));
        let controller = match lease {
            Some(lease) => tokio::spawn(lead_when_elected(client, ctx, lease, shutdown)),
            None => tokio::spawn(async move {
                ctx.metrics.leader.set(1);
                controller::run(ctx, signalled(shutdown, true)).await;
                Ok(())
            }),
        };
        tasks.push(("controller", controller));
        Ok(Operator { metrics, tasks })
    }

    /// Whether this replica currently runs the controller.
    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// Waits until everything stopped (after the shutdown signal); the first failure, if any.
    pub async fn wait(self) -> Result<(), String> {
        let mut first_error = None;
        for (what, task) in self.tasks {
            let result = match task.await {
                Ok(result) => result,
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = result {
                warn!(task = what, error = %e, "stopped with an error");
                first_error.get_or_insert(format!("{what} failed: {e}"));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Resolves once `rx` holds `value` (or its sender is gone).
async fn signalled(mut rx: watch::Receiver<bool>, value: bool) {
    let _ = rx.wait_for(|v| *v == value).await;
}

/// Serves `router` within `limits` (owned, so the spawned task owns them).
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: WebLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    web::server::serve(listener, router, &limits, shutdown).await
}

/// Keeps `/readyz` honest: the API server is asked for its version periodically.
async fn api_probe(
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let stop = signalled(shutdown, true);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(API_PROBE_INTERVAL) => {
                metrics.set_api_reachable(client.apiserver_version().await.is_ok());
            }
        }
    }
}

/// Runs the controller while this replica holds the Lease, stopping it as soon as leadership
/// is lost, until shutdown. On shutdown the controller stops first (in-flight reconciles
/// finish, so a refreshed token is stored), then the Lease is released so a successor takes
/// over within its retry period instead of after the lease duration.
///
/// Failing to join the election (the API server did not answer the first Lease request) or the
/// lease manager stopping on its own is never the end: the replica campaigns again after
/// [`ELECTION_RETRY`]. Giving up would leave a process that serves `/healthz` but never leads.
async fn lead_when_elected(
    client: Client,
    ctx: Arc<Context>,
    lease: LeaseSettings,
    shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    loop {
        match leader::elect(client.clone(), &lease).await {
            Ok(election) => {
                if lead_while_elected(&ctx, &lease, election, shutdown.clone()).await {
                    return Ok(());
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?ELECTION_RETRY, "joining the leader election failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(ELECTION_RETRY) => {}
            _ = signalled(shutdown.clone(), true) => return Ok(()),
        }
    }
}

/// Leads whenever `election` says so; returns `true` on shutdown, `false` when the lease
/// manager stopped on its own (the caller campaigns again). Releases the Lease either way.
async fn lead_while_elected(
    ctx: &Arc<Context>,
    lease: &LeaseSettings,
    election: leader::Election,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut is_leader = election.is_leader;
    info!(identity = %lease.identity, lease = %lease.name, "waiting for leadership");
    let stopping = loop {
        if *shutdown.borrow() {
            break true;
        }
        if *is_leader.borrow_and_update() {
            info!("became leader; starting the controller");
            ctx.metrics.leader.set(1);
            let lost = signalled(is_leader.clone(), false);
            let stop = signalled(shutdown.clone(), true);
            controller::run(ctx.clone(), async move {
                tokio::select! {
                    _ = lost => {}
                    _ = stop => {}
                }
            })
            .await;
            ctx.metrics.leader.set(0);
            info!("controller stopped (leadership lost or shutting down)");
            continue;
        }
        tokio::select! {
            changed = is_leader.changed() => {
                if changed.is_err() {
                    warn!("lease manager stopped");
                    break false;
                }
            }
            _ = shutdown.changed() => {}
        }
    };
    // Dropping the receiver makes the manager release the Lease and finish.
    drop(is_leader);
    match election.task.await {
        Ok(Ok(_)) => info!("lease released"),
        Ok(Err(e)) => warn!(error = %e, "releasing the lease failed"),
        Err(e) => warn!(error = %e, "lease task failed"),
    }
    stopping
}
