//! The subcommands for the people who run the operator (like cert-manager's `cmctl`): `status`,
//! `link`, `refresh` and `rotate-link`. They read one GoToOAuthClient and ask the operator to act
//! through the annotations it already watches, with the current kubeconfig (or `--kubeconfig`,
//! `--context`) and `-n`, like kubectl. They never read a Secret, so they cannot print a token or
//! a client secret. Each failure has its own exit code ([`Exit`]), documented in the README.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Subcommand;
use jiff::Timestamp;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};

use super::summary;
use crate::resource::{FORCE_REFRESH_ANNOTATION, GoToOAuthClient, ROTATE_LINK_ANNOTATION};

/// How often `--wait` reads the client.
const POLL: Duration = Duration::from_millis(500);

#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Summarise a GoToOAuthClient: Ready and why, token expiry, next refresh, account, the link
    /// when a consent is needed, and what to do. Exits 1 when it is not Ready.
    Status(ClientArgs),
    /// Print only the authorization link (for scripts and e-mails). Exits 1 when the client
    /// publishes none, saying why on stderr.
    Link(ClientArgs),
    /// Ask the operator to refresh the access token now (annotation
    /// goto-oauth.dev/refresh-requested).
    Refresh(ActionArgs),
    /// Replace the authorization link; the old one and attempts started from it stop working
    /// (annotation goto-oauth.dev/rotate-authorization-link).
    RotateLink(ActionArgs),
}

/// Which client, on which cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Name of the GoToOAuthClient.
    pub name: String,
    #[command(flatten)]
    pub target: Target,
}

/// The cluster and namespace, chosen as kubectl chooses them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Target {
    /// Namespace of the client. Default: the kubeconfig context's namespace, else `default`.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Kubeconfig file. Default: $KUBECONFIG, else ~/.kube/config, else the in-cluster config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context. Default: the current context.
    #[arg(long)]
    pub context: Option<String>,
}

/// A subcommand that asks the operator to act, and may wait until it did.
#[derive(clap::Args, Debug, Clone)]
pub struct ActionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// Wait until the operator acted: `refresh` until the new tokens are stored (exit 1 if the
    /// refresh fails), `rotate-link` until the new link is published (then print it).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits before giving up (exit 1), e.g. 30s or 2m.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: Duration,
}

/// Exit codes of the client subcommands. clap's usage errors exit 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done; for `status`, the client is Ready.
    Ok = 0,
    /// The client is not as asked: not Ready (`status`), no link (`link`), not refreshable or
    /// the refresh failed (`refresh`), or `--wait` timed out.
    NotReady = 1,
    /// The API server cannot be reached, or no usable kubeconfig was found.
    Unreachable = 3,
    /// No such GoToOAuthClient in the namespace (or the CRD is not installed).
    NotFound = 4,
    /// The API server refused: not allowed (403) or not authenticated (401).
    Forbidden = 5,
    /// Any other error answer of the API server.
    ApiError = 6,
}

/// A subcommand's failure: its exit code and what to tell the user on stderr.
#[derive(Debug)]
struct Failure {
    exit: Exit,
    message: String,
}

impl Failure {
    fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

/// What a subcommand prints on stdout, and its exit code.
struct Outcome {
    stdout: String,
    exit: Exit,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome {
            stdout,
            exit: Exit::Ok,
        }
    }
}

/// Runs a client subcommand: its output on stdout, errors on stderr, the exit code returned.
pub async fn main(command: ClientCommand) -> ExitCode {
    match execute(command).await {
        Ok(outcome) => {
            print!("{}", outcome.stdout);
            ExitCode::from(outcome.exit as u8)
        }
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit as u8)
        }
    }
}

async fn execute(command: ClientCommand) -> Result<Outcome, Failure> {
    match command {
        ClientCommand::Status(args) => {
            let obj = Session::open(&args).await?.get().await?;
            let summary = summary::render(&obj, Timestamp::now());
            Ok(Outcome {
                stdout: summary.text,
                exit: if summary.ready {
                    Exit::Ok
                } else {
                    Exit::NotReady
                },
            })
        }
        ClientCommand::Link(args) => {
            let obj = Session::open(&args).await?.get().await?;
            summary::link(&obj)
                .map(|link| Outcome::ok(format!("{link}\n")))
                .map_err(|why| Failure::new(Exit::NotReady, why))
        }
        ClientCommand::Refresh(args) => refresh(args).await,
        ClientCommand::RotateLink(args) => rotate_link(args).await,
    }
}

async fn refresh(args: ActionArgs) -> Result<Outcome, Failure> {
    let session = Session::open(&args.client).await?;
    let before = session.get().await?;
    if let Some(why) = summary::refresh_blocker(&before) {
        return Err(Failure::new(Exit::NotReady, why));
    }
    let answer =
        |obj: &GoToOAuthClient, requested: &str| summary::refresh_outcome(obj, requested, &before);
    act(
        &session,
        FORCE_REFRESH_ANNOTATION,
        &args.wait,
        "a refresh",
        answer,
    )
    .await
}

async fn rotate_link(args: ActionArgs) -> Result<Outcome, Failure> {
    let session = Session::open(&args.client).await?;
    let answer = |obj: &GoToOAuthClient, requested: &str| {
        let handled = obj
            .status
            .as_ref()
            .and_then(|s| s.handled_link_rotation.as_deref());
        (handled == Some(requested)).then(|| summary::link(obj).map(|link| format!("{link}\n")))
    };
    act(
        &session,
        ROTATE_LINK_ANNOTATION,
        &args.wait,
        "a new link",
        answer,
    )
    .await
}

/// Asks the operator for `what` by a new value of `annotation`; with `--wait`, reads the client
/// until `answer` (given that value) says what came of it.
async fn act(
    session: &Session,
    annotation: &str,
    wait: &WaitArgs,
    what: &str,
    mut answer: impl FnMut(&GoToOAuthClient, &str) -> Option<Result<String, String>>,
) -> Result<Outcome, Failure> {
    let requested = session.request(annotation).await?;
    if !wait.wait {
        return Ok(Outcome::ok(format!(
            "requested {what} for {} ({annotation}={requested}); the operator acts on it shortly\n",
            session.name()
        )));
    }
    session
        .wait(wait, what, |obj| answer(obj, &requested))
        .await?
        .map(Outcome::ok)
        .map_err(|why| Failure::new(Exit::NotReady, why))
}

/// One client on one cluster, with kube errors turned into [`Failure`]s that name it.
struct Session {
    api: Api<GoToOAuthClient>,
    namespace: String,
    name: String,
}

impl Session {
    async fn open(args: &ClientArgs) -> Result<Session, Failure> {
        let mut config = config(&args.target)
            .await
            .map_err(|e| Failure::new(Exit::Unreachable, e))?;
        // Fail fast on an unreachable cluster instead of kube's long defaults.
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(Duration::from_secs(30));
        let namespace = args
            .target
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| {
            Failure::new(
                Exit::Unreachable,
                format!("cannot configure a Kubernetes client: {e}"),
            )
        })?;
        Ok(Session {
            api: Api::namespaced(client, &namespace),
            namespace,
            name: args.name.clone(),
        })
    }

    fn name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn get(&self) -> Result<GoToOAuthClient, Failure> {
        self.api.get(&self.name).await.map_err(|e| self.failure(e))
    }

    /// Sets `annotation` to a new value (the current time, so any earlier request differs) and
    /// returns that value.
    async fn request(&self, annotation: &str) -> Result<String, Failure> {
        let value = Timestamp::now().to_string();
        let patch = serde_json::json!({"metadata": {"annotations": {annotation: value}}});
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| self.failure(e))?;
        Ok(value)
    }

    /// Reads the client until `done` answers, for at most `--timeout`.
    async fn wait<T>(
        &self,
        wait: &WaitArgs,
        what: &str,
        mut done: impl FnMut(&GoToOAuthClient) -> Option<T>,
    ) -> Result<T, Failure> {
        let deadline = tokio::time::Instant::now() + wait.timeout;
        loop {
            let obj = self.get().await?;
            if let Some(answer) = done(&obj) {
                return Ok(answer);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Failure::new(
                    Exit::NotReady,
                    format!(
                        "the operator did not answer the request for {what} for {} within {}; is it running? The request stays and is acted on when it is.",
                        self.name(),
                        humantime::format_duration(wait.timeout)
                    ),
                ));
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    fn failure(&self, e: kube::Error) -> Failure {
        let name = self.name();
        match e {
            kube::Error::Api(status) => match status.code {
                404 => Failure::new(
                    Exit::NotFound,
                    format!(
                        "no GoToOAuthClient {name} (is the name or -n wrong, or the CRD not installed?): {}",
                        status.message
                    ),
                ),
                401 | 403 => Failure::new(
                    Exit::Forbidden,
                    format!(
                        "the API server refused access to GoToOAuthClient {name} ({}): {}",
                        status.code, status.message
                    ),
                ),
                code => Failure::new(
                    Exit::ApiError,
                    format!(
                        "the API server answered {code} for GoToOAuthClient {name}: {}",
                        status.message
                    ),
                ),
            },
            e @ (kube::Error::HyperError(_)
            | kube::Error::Service(_)
            | kube::Error::Auth(_)
            | kube::Error::RustlsTls(_)
            | kube::Error::TlsRequired
            | kube::Error::ProxyProtocolUnsupported { .. }
            | kube::Error::ProxyProtocolDisabled { .. }) => Failure::new(
                Exit::Unreachable,
                format!("cannot reach the Kubernetes API server: {e}"),
            ),
            e => Failure::new(
                Exit::ApiError,
                format!("reading GoToOAuthClient {name} failed: {e}"),
            ),
        }
    }
}

/// The client configuration kubectl would use with the same flags.
async fn config(target: &Target) -> Result<Config, String> {
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..Default::default()
    };
    match &target.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read the kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("cannot use the kubeconfig {}: {e}", path.display()))
        }
        None if target.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| format!("cannot use the kubeconfig: {e}")),
        None => Config::infer().await.map_err(|e| {
            format!("no usable kubeconfig ($KUBECONFIG, ~/.kube/config) or in-cluster config: {e}")
        }),
    }
}
