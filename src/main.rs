//! Entry point: parses flags and wires the modules together; no logic of its own.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use goto_oauth_operator::{
    cli::{Cli, Command, RunArgs},
    controller::{Context, LeaseHolder, Settings},
    leader, metrics,
    refresh::Clock,
    resource, state, telemetry,
    validation::Defaults,
    web,
};
use tokio::sync::watch;
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match resource::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: could not render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            telemetry::init(args.log_format);
            match run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    error!("{message}");
                    eprintln!("error: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("cannot configure a Kubernetes client (KUBECONFIG or in-cluster): {e}")
    })?;
    let state_key = state::load_or_create_key(
        client.clone(),
        &args.operator_namespace,
        &args.state_key_secret,
    )
    .await
    .map_err(|e| {
        format!(
            "cannot load or create the state key Secret {}/{}: {e}",
            args.operator_namespace, args.state_key_secret
        )
    })?;

    let metrics = Arc::new(metrics::Metrics::default());
    metrics.set_api_reachable(true);
    let identity = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("goto-oauth-operator-{}", std::process::id()));
    let settings = Settings {
        defaults: Defaults {
            public_url: args.public_url.clone(),
            authorize_url: args.authorize_url.clone(),
            token_url: args.token_url.clone(),
        },
        token_rate_limit: args.token_rate_limit,
        max_concurrent_refreshes: args.max_concurrent_refreshes,
        token_timeout: args.token_timeout,
        namespaces: args.namespaces.clone(),
        reporter_instance: Some(identity.clone()),
        lease: args.leader_election.then(|| LeaseHolder {
            namespace: args.operator_namespace.clone(),
            name: args.lease_name.clone(),
            identity: identity.clone(),
        }),
    };
    let ctx = Context::new(
        client.clone(),
        settings,
        metrics.clone(),
        state_key,
        Clock::system(),
    )
    .map_err(|e| format!("cannot build the HTTP client: {e}"))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        let _ = shutdown_tx.send(true);
    });

    let web_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", args.listen))?;
    let ops_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (--metrics-listen): {e}",
                args.metrics_listen
            )
        })?;
    info!(listen = %args.listen, metrics = %args.metrics_listen, public_url = %args.public_url, "serving");
    let web_server = serve(web_listener, web::router(ctx.clone()), shutdown_rx.clone());
    let ops_server = serve(
        ops_listener,
        metrics::ops_router(metrics.clone()),
        shutdown_rx.clone(),
    );
    let probe = api_probe(client.clone(), metrics.clone(), shutdown_rx.clone());

    let controller = async {
        if args.leader_election {
            let lease = leader::LeaseSettings {
                namespace: args.operator_namespace.clone(),
                name: args.lease_name.clone(),
                identity,
                duration: Duration::from_secs(15),
                grace: Duration::from_secs(5),
            };
            leader::run_when_leader(client.clone(), ctx.clone(), lease, shutdown_rx.clone())
                .await
                .map_err(|e| format!("leader election failed: {e}"))
        } else {
            leader::run_always(ctx.clone(), shutdown_rx.clone()).await;
            Ok(())
        }
    };
    let (controller, web_result, ops_result, ()) =
        tokio::join!(controller, web_server, ops_server, probe);
    controller?;
    web_result.map_err(|e| format!("authorize endpoint failed: {e}"))?;
    ops_result.map_err(|e| format!("metrics endpoint failed: {e}"))?;
    info!("stopped");
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// Keeps `/readyz` honest: the API server is asked for its version every 10 s.
async fn api_probe(
    client: kube::Client,
    metrics: Arc<metrics::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                metrics.set_api_reachable(client.apiserver_version().await.is_ok());
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
