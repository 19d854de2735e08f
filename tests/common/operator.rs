//! The operator in-process, for tests that need to control time (a manual [`Clock`]) or run
//! several replicas side by side. It wires the same pieces as `main.rs`: the controller (with or
//! without leader election) and the authorize/callback endpoint on a loopback port.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use goto_oauth_operator::{
    controller::{Context, Settings},
    leader::{self, LeaseSettings},
    metrics::Metrics,
    refresh::Clock,
    state::load_or_create_key,
    validation::Defaults,
    web,
};

/// How to run an in-process operator.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces to watch (empty: all).
    pub namespaces: Vec<String>,
    /// Where the Lease and the state-key Secret live.
    pub operator_namespace: String,
    pub authorize_url: String,
    pub token_url: String,
    pub clock: Clock,
    /// `Some(identity)`: elect a leader on the Lease `goto-oauth-operator`; `None`: always lead.
    pub leader_identity: Option<String>,
    pub token_rate_limit: u32,
    pub max_concurrent_refreshes: u32,
    pub token_timeout: Duration,
}

impl Options {
    /// Defaults for one namespace and the given provider URLs.
    pub fn new(namespace: &str, authorize_url: &str, token_url: &str) -> Options {
        Options {
            namespaces: vec![namespace.to_string()],
            operator_namespace: namespace.to_string(),
            authorize_url: authorize_url.to_string(),
            token_url: token_url.to_string(),
            clock: Clock::system(),
            leader_identity: None,
            token_rate_limit: 10,
            max_concurrent_refreshes: 10,
            token_timeout: Duration::from_secs(10),
        }
    }
}

/// A running in-process operator; stop it with [`InProcessOperator::stop`].
pub struct InProcessOperator {
    pub ctx: Arc<Context>,
    pub metrics: Arc<Metrics>,
    /// `http://127.0.0.1:PORT`, also the public URL (so the redirect URI is `<it>/callback`).
    pub public_url: String,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl InProcessOperator {
    /// Starts an operator whose endpoint listens on `listener` (bind it first to know the port).
    pub async fn start(
        client: kube::Client,
        listener: tokio::net::TcpListener,
        options: Options,
    ) -> Result<InProcessOperator, String> {
        let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
        let public_url = format!("http://{addr}");
        let state_key = load_or_create_key(
            client.clone(),
            &options.operator_namespace,
            "goto-oauth-operator-state-key",
        )
        .await
        .map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::default());
        metrics.set_api_reachable(true);
        let parse = |u: &str| url::Url::parse(u).map_err(|e| e.to_string());
        let settings = Settings {
            defaults: Defaults {
                public_url: parse(&public_url)?,
                authorize_url: parse(&options.authorize_url)?,
                token_url: parse(&options.token_url)?,
            },
            token_rate_limit: options.token_rate_limit,
            max_concurrent_refreshes: options.max_concurrent_refreshes,
            token_timeout: options.token_timeout,
            namespaces: options.namespaces.clone(),
            reporter_instance: options.leader_identity.clone(),
            lease: options.leader_identity.clone().map(|identity| {
                goto_oauth_operator::controller::LeaseHolder {
                    namespace: options.operator_namespace.clone(),
                    name: "goto-oauth-operator".into(),
                    identity,
                }
            }),
        };
        let ctx = Context::new(
            client.clone(),
            settings,
            metrics.clone(),
            state_key,
            options.clock.clone(),
        )
        .map_err(|e| e.to_string())?;
        let (shutdown, shutdown_rx) = watch::channel(false);

        let router = web::router(ctx.clone());
        let mut stop = shutdown_rx.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
        let controller = match options.leader_identity.clone() {
            Some(identity) => {
                let lease = LeaseSettings {
                    namespace: options.operator_namespace.clone(),
                    name: "goto-oauth-operator".into(),
                    identity,
                    duration: Duration::from_secs(4),
                    grace: Duration::from_secs(1),
                };
                let ctx = ctx.clone();
                let rx = shutdown_rx.clone();
                tokio::spawn(async move {
                    let _ = leader::run_when_leader(client, ctx, lease, rx).await;
                })
            }
            None => tokio::spawn(leader::run_always(ctx.clone(), shutdown_rx)),
        };
        Ok(InProcessOperator {
            ctx,
            metrics,
            public_url,
            shutdown,
            tasks: vec![server, controller],
        })
    }

    /// Whether this replica currently runs the controller.
    pub fn is_leader(&self) -> bool {
        self.metrics.leader.get() == 1
    }

    /// Stops the controller and the endpoint, waiting for both (leases are released).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
    }
}
