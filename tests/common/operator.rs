//! The operator in-process, for tests that need to control time (a manual [`Clock`]) or run
//! several replicas side by side: `app::Operator::start`, the start-up `main` uses, on a
//! loopback port with test-sized Lease timings.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use goto_oauth_operator::{
    app::{Config, LeaseTiming, Listeners, Operator},
    cli::DEFAULT_ALLOWED_ENDPOINT_HOSTS,
    clock::Clock,
    leader::Timing,
    metrics::Metrics,
    validation::AllowedHost,
    web::server::WebLimits,
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
    /// `--allowed-endpoint-hosts` (default: GoTo's hosts, as in production).
    pub allowed_endpoint_hosts: Vec<String>,
    pub clock: Clock,
    /// `Some(identity)`: elect a leader on the Lease `goto-oauth-operator`; `None`: always lead.
    pub leader_identity: Option<String>,
    /// The Lease timings when electing (test-sized by default: 4 s, renewed 1 s before expiry,
    /// a released Lease found within 500 ms).
    pub lease_timing: Timing,
    pub token_rate_limit: u32,
    pub max_concurrent_refreshes: u32,
    pub token_timeout: Duration,
    /// Bounds of the endpoint's connections and requests.
    pub web_limits: WebLimits,
}

impl Options {
    /// Defaults for one namespace and the given provider URLs.
    pub fn new(namespace: &str, authorize_url: &str, token_url: &str) -> Options {
        Options {
            namespaces: vec![namespace.to_string()],
            operator_namespace: namespace.to_string(),
            authorize_url: authorize_url.to_string(),
            token_url: token_url.to_string(),
            allowed_endpoint_hosts: DEFAULT_ALLOWED_ENDPOINT_HOSTS
                .split(',')
                .map(str::to_string)
                .collect(),
            clock: Clock::system(),
            leader_identity: None,
            lease_timing: Timing {
                duration: Duration::from_secs(4),
                renew_before: Duration::from_secs(1),
                retry_period: Duration::from_millis(500),
            },
            token_rate_limit: 10,
            max_concurrent_refreshes: 10,
            token_timeout: Duration::from_secs(10),
            web_limits: WebLimits::default(),
        }
    }
}

/// A running in-process operator; stop it with [`InProcessOperator::stop`].
pub struct InProcessOperator {
    pub metrics: Arc<Metrics>,
    /// `http://127.0.0.1:PORT`, also the public URL (so the redirect URI is `<it>/callback`).
    pub public_url: String,
    shutdown: watch::Sender<bool>,
    operator: Operator,
}

impl InProcessOperator {
    /// Starts an operator whose endpoint listens on `listener` (bind it first to know the port).
    pub async fn start(
        client: kube::Client,
        listener: tokio::net::TcpListener,
        options: Options,
    ) -> Result<InProcessOperator, String> {
        let public_url = format!(
            "http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let parse = |u: &str| url::Url::parse(u).map_err(|e| e.to_string());
        let config = Config {
            public_url: parse(&public_url)?,
            authorize_url: parse(&options.authorize_url)?,
            token_url: parse(&options.token_url)?,
            allowed_endpoint_hosts: options
                .allowed_endpoint_hosts
                .iter()
                .map(|h| AllowedHost::parse(h))
                .collect::<Result<_, _>>()?,
            namespaces: options.namespaces,
            operator_namespace: options.operator_namespace,
            state_key_secret: "goto-oauth-operator-state-key".into(),
            identity: options
                .leader_identity
                .clone()
                .unwrap_or_else(|| "in-process".into()),
            lease: options.leader_identity.map(|_| LeaseTiming {
                name: "goto-oauth-operator".into(),
                timing: options.lease_timing,
            }),
            token_rate_limit: options.token_rate_limit,
            max_concurrent_refreshes: options.max_concurrent_refreshes,
            token_timeout: options.token_timeout,
            clock: options.clock,
            web_limits: options.web_limits,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let listeners = Listeners {
            web: listener,
            ops: None,
        };
        let operator = Operator::start(config, client, listeners, shutdown_rx)
            .await
            .map_err(|e| e.to_string())?;
        Ok(InProcessOperator {
            metrics: operator.metrics.clone(),
            public_url,
            shutdown,
            operator,
        })
    }

    /// Whether this replica currently runs the controller.
    pub fn is_leader(&self) -> bool {
        self.operator.is_leader()
    }

    /// Stops the controller and the endpoint, waiting for both (leases are released).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.operator.wait()).await;
    }
}
