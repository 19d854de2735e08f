//! Entry point: parses flags, starts telemetry and the operator, waits for a signal. No logic
//! of its own.

use std::process::ExitCode;

use goto_oauth_operator::{
    app::{Config, LeaseTiming, Listeners, Operator},
    cli::{self, Command, RunArgs},
    clock::Clock,
    resource, telemetry,
    web::server::WebLimits,
};
use tokio::sync::watch;
use tracing::{error, info};

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: goto_oauth_operator::allocator::Allocator =
    goto_oauth_operator::allocator::Allocator {};

fn main() -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(operate()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn operate() -> ExitCode {
    match cli::parse() {
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
        Command::Client(command) => cli::client::main(command).await,
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let lease_timing = args.lease_timing().map_err(|e| e.to_string())?;
    let client = goto_oauth_operator::api_client::infer()
        .await
        .map_err(|e| {
            format!("cannot configure a Kubernetes client (KUBECONFIG or in-cluster): {e}")
        })?;
    let web = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", args.listen))?;
    let ops = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (--metrics-listen): {e}",
                args.metrics_listen
            )
        })?;
    let identity = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("goto-oauth-operator-{}", std::process::id()));
    let config = Config {
        public_url: args.public_url.clone(),
        authorize_url: args.authorize_url,
        token_url: args.token_url,
        allowed_endpoint_hosts: args.allowed_endpoint_hosts,
        namespaces: args.namespaces,
        operator_namespace: args.operator_namespace.clone(),
        state_key_secret: args.state_key_secret.clone(),
        identity,
        lease: args.leader_election.then_some(LeaseTiming {
            name: args.lease_name.clone(),
            timing: lease_timing,
        }),
        token_rate_limit: args.token_rate_limit,
        max_concurrent_refreshes: args.max_concurrent_refreshes,
        token_timeout: args.token_timeout,
        clock: Clock::system(),
        web_limits: WebLimits {
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout.into(),
            ..WebLimits::default()
        },
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        let _ = shutdown_tx.send(true);
    });
    info!(listen = %args.listen, metrics = %args.metrics_listen, public_url = %args.public_url, "serving");
    let operator = Operator::start(
        config,
        client,
        Listeners {
            web,
            ops: Some(ops),
        },
        shutdown_rx,
    )
    .await
    .map_err(|e| e.to_string())?;
    operator.wait().await?;
    info!("stopped");
    Ok(())
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
