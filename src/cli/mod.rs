//! Command-line interface: `run` starts the operator, `crd` prints the CRD YAML, and `status`,
//! `link`, `refresh` and `rotate-link` help the people who run it ([`client`]).
//!
//! Every flag of `run` has an environment variable, so the Deployment can configure the operator
//! without a wrapper script. clap turns bad flags into a message and exit code 2. Installed as
//! `kubectl-goto_oauth`, the binary is a kubectl plugin offering only the client subcommands.

pub mod client;
mod summary;

use std::{ffi::OsString, net::SocketAddr, path::Path, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use url::Url;

use crate::leader::{Timing, TimingError};
use crate::validation::AllowedHost;
use crate::web::server::WebLimits;

/// GoTo's production authorization endpoint (GoTo "New Token Retrieval Migration Guide").
pub const DEFAULT_AUTHORIZE_URL: &str = "https://authentication.logmeininc.com/oauth/authorize";
/// GoTo's production token endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://authentication.logmeininc.com/oauth/token";
/// GoTo's hosts: the current one (authorize and token) and the legacy token host
/// (`api.getgo.com/oauth/v2/token`, decommissioned by GoTo in 2025 but still GoTo's, so a spec
/// that names it fails at GoTo rather than being refused as someone else's host).
pub const DEFAULT_ALLOWED_ENDPOINT_HOSTS: &str = "authentication.logmeininc.com,api.getgo.com";

/// Keeps GoTo (LogMeIn) OAuth tokens alive as Kubernetes Secrets.
#[derive(Parser, Debug)]
#[command(name = "goto-oauth-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: controller, authorize/callback endpoint, health and metrics.
    Run(Box<RunArgs>),
    /// Print the GoToOAuthClient CustomResourceDefinition as YAML.
    Crd,
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// The file name (without extension) under which the binary is a kubectl plugin:
/// `kubectl goto-oauth ...` runs `kubectl-goto_oauth ...`.
pub const PLUGIN_NAME: &str = "kubectl-goto_oauth";

/// The same binary as a kubectl plugin: only the client subcommands.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl goto-oauth",
    bin_name = "kubectl goto-oauth",
    version,
    about
)]
struct Plugin {
    #[command(subcommand)]
    command: client::ClientCommand,
}

/// Parses the process's arguments, as the operator binary or as the kubectl plugin (told apart by
/// the name it was invoked as); prints clap's message and exits (2) on bad input.
pub fn parse() -> Command {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] on given arguments, the first being the invoked name.
pub fn try_parse_from(args: impl IntoIterator<Item = OsString>) -> Result<Command, clap::Error> {
    let args: Vec<OsString> = args.into_iter().collect();
    let as_plugin = args
        .first()
        .and_then(|argv0| Path::new(argv0).file_stem())
        .is_some_and(|stem| stem == PLUGIN_NAME);
    if as_plugin {
        Plugin::try_parse_from(args).map(|p| Command::Client(p.command))
    } else {
        Cli::try_parse_from(args).map(|cli| cli.command)
    }
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the authorize/callback HTTP endpoint.
    #[arg(long, env = "GOTO_OAUTH_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "GOTO_OAUTH_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// External base URL at which people reach the authorize endpoint (https, or http on localhost).
    #[arg(long, env = "GOTO_OAUTH_PUBLIC_URL", value_parser = parse_public_url)]
    pub public_url: Url,

    /// Namespace to watch; repeat for several. None: all namespaces.
    #[arg(
        long = "namespace",
        env = "GOTO_OAUTH_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,

    /// Default GoTo authorization URL.
    #[arg(long, env = "GOTO_OAUTH_AUTHORIZE_URL", default_value = DEFAULT_AUTHORIZE_URL, value_parser = parse_endpoint_url)]
    pub authorize_url: Url,

    /// Default GoTo token URL.
    #[arg(long, env = "GOTO_OAUTH_TOKEN_URL", default_value = DEFAULT_TOKEN_URL, value_parser = parse_endpoint_url)]
    pub token_url: Url,

    /// Hosts a GoToOAuthClient's spec.endpoints may name, besides those of --authorize-url and
    /// --token-url (always allowed).
    ///
    /// Comma-separated `host` or `host:port`; a host without a port allows only the scheme's
    /// default port. Hosts match exactly: no wildcards, subdomains or trailing dots; list an IDN in
    /// its xn-- form. Setting this replaces the default list; keep GoTo's hosts in it when clients
    /// may still name them. A spec naming any other host is InvalidSpec: its link never redirects
    /// there and no token request is sent there.
    #[arg(
        long,
        env = "GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS",
        value_delimiter = ',',
        default_value = DEFAULT_ALLOWED_ENDPOINT_HOSTS,
        value_parser = AllowedHost::parse
    )]
    pub allowed_endpoint_hosts: Vec<AllowedHost>,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "GOTO_OAUTH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Namespace the operator runs in: home of its Lease and its state-key Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "goto-oauth-operator")]
    pub operator_namespace: String,

    /// This replica's identity for leader election (defaults to the host name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Elect a leader through a Lease so that only one replica reconciles and refreshes.
    #[arg(long, env = "GOTO_OAUTH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "GOTO_OAUTH_LEASE_NAME",
        default_value = "goto-oauth-operator"
    )]
    pub lease_name: String,

    /// How long the Lease stays valid after its holder last renewed it: a leader killed without
    /// releasing it (kill -9, node loss) is replaced after at most this long. Whole seconds.
    /// Shorter fails over faster but writes the Lease more often and makes a slow API server
    /// more likely to cost the leader its Lease.
    #[arg(long, env = "GOTO_OAUTH_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// How long before the Lease expires its holder renews it (so it renews every
    /// duration − this); also the clock skew between nodes tolerated. Whole seconds, shorter
    /// than --lease-duration.
    #[arg(long, env = "GOTO_OAUTH_LEASE_RENEW_BEFORE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_renew_before: Duration,

    /// How often a replica that does not lead reads the Lease to find it released: after a
    /// graceful stop of the leader, the hand-over takes at most this long.
    #[arg(long, env = "GOTO_OAUTH_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_retry_period: Duration,

    /// Secret (in the operator namespace) holding the key that signs `state`; created once.
    #[arg(
        long,
        env = "GOTO_OAUTH_STATE_KEY_SECRET",
        default_value = "goto-oauth-operator-state-key"
    )]
    pub state_key_secret: String,

    /// Requests per second the operator sends to GoTo's token endpoints, over all clients.
    #[arg(long, env = "GOTO_OAUTH_TOKEN_RATE_LIMIT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub token_rate_limit: u32,

    /// Refreshes in flight at once.
    #[arg(long, env = "GOTO_OAUTH_MAX_CONCURRENT_REFRESHES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_concurrent_refreshes: u32,

    /// Timeout of one token-endpoint request.
    #[arg(long, env = "GOTO_OAUTH_TOKEN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub token_timeout: Duration,

    /// Connections each HTTP listener holds open at once; more are closed as soon as accepted.
    #[arg(long, env = "GOTO_OAUTH_MAX_CONNECTIONS", default_value_t = WebLimits::default().max_connections, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub max_connections: usize,

    /// Time a client has to send a request's headers (and longest wait between kept-alive requests).
    #[arg(long, env = "GOTO_OAUTH_HEADER_READ_TIMEOUT", default_value_t = WebLimits::default().header_read_timeout.into())]
    pub header_read_timeout: humantime::Duration,
}

impl RunArgs {
    /// The Lease timings of the flags, checked against each other.
    pub fn lease_timing(&self) -> Result<Timing, TimingError> {
        Timing::new(
            self.lease_duration,
            self.lease_renew_before,
            self.lease_retry_period,
        )
    }
}

fn parse_public_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    check_web_url(&url)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the public URL must not have a query or fragment".into());
    }
    Ok(url)
}

fn parse_endpoint_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    check_web_url(&url)?;
    Ok(url)
}

/// https everywhere; http only where the traffic never leaves the machine (development, tests).
pub fn check_web_url(url: &Url) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(url) => Ok(()),
        "http" => Err(format!(
            "{url} uses http; only https is allowed (http only for localhost/127.0.0.1)"
        )),
        other => Err(format!("{url} has scheme {other}; expected https")),
    }
}

/// Whether the URL points at this machine (localhost, 127.0.0.0/8, ::1).
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("goto-oauth-operator").chain(args.iter().copied()))
    }

    fn parse_as(argv0: &str, args: &[&str]) -> Result<Command, clap::Error> {
        try_parse_from(
            std::iter::once(argv0)
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn client_subcommands_parse_as_the_binary_and_as_the_plugin() {
        for argv0 in [
            "goto-oauth-operator",
            "/usr/local/bin/kubectl-goto_oauth",
            "kubectl-goto_oauth.exe",
        ] {
            let Ok(Command::Client(client::ClientCommand::Refresh(args))) = parse_as(
                argv0,
                &["refresh", "demo", "-n", "ns", "--wait", "--timeout", "30s"],
            ) else {
                panic!("{argv0}: expected refresh")
            };
            assert_eq!(args.client.name, "demo");
            assert_eq!(args.client.target.namespace.as_deref(), Some("ns"));
            assert!(args.wait.wait);
            assert_eq!(args.wait.timeout, Duration::from_secs(30));
        }
        // The plugin offers only the client subcommands.
        let err = parse_as("kubectl-goto_oauth", &["run"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse_as("kubectl-goto_oauth", &["status"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "NAME is required");
        assert!(matches!(
            parse_as(
                "goto-oauth-operator",
                &["link", "demo", "--context", "c", "--kubeconfig", "/k"]
            ),
            Ok(Command::Client(client::ClientCommand::Link(_)))
        ));
    }

    #[test]
    fn run_needs_public_url() {
        let err = parse(&["run"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--public-url"));
    }

    #[test]
    fn http_public_url_only_on_localhost() {
        assert!(parse(&["run", "--public-url", "http://127.0.0.1:8080"]).is_ok());
        let err = parse(&["run", "--public-url", "http://example.com"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("only https"));
    }

    #[test]
    fn namespaces_repeat_and_defaults_apply() {
        let cli = parse(&[
            "run",
            "--public-url",
            "https://x.example",
            "--namespace",
            "a",
            "--namespace",
            "b",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.namespaces, vec!["a", "b"]);
        assert_eq!(args.token_url.as_str(), DEFAULT_TOKEN_URL);
        assert_eq!(args.token_rate_limit, 10);
        assert!(args.leader_election);
        assert_eq!(
            args.allowed_endpoint_hosts,
            [
                AllowedHost::parse("authentication.logmeininc.com").unwrap(),
                AllowedHost::parse("api.getgo.com").unwrap()
            ]
        );
    }

    #[test]
    fn lease_timings_default_and_are_checked_together() {
        let run = |extra: &[&str]| {
            let mut args = vec!["run", "--public-url", "https://x.example"];
            args.extend_from_slice(extra);
            match parse(&args).unwrap().command {
                Command::Run(args) => args,
                _ => panic!("expected run"),
            }
        };
        assert_eq!(run(&[]).lease_timing(), Ok(Timing::DEFAULT));
        let short = run(&[
            "--lease-duration",
            "4s",
            "--lease-renew-before",
            "1s",
            "--lease-retry-period",
            "500ms",
        ]);
        assert_eq!(
            short.lease_timing().map(|t| t.retry_period),
            Ok(Duration::from_millis(500))
        );
        let err = run(&["--lease-duration", "5s", "--lease-renew-before", "5s"])
            .lease_timing()
            .unwrap_err();
        assert!(matches!(err, TimingError::RenewAfterExpiry { .. }), "{err}");
    }

    #[test]
    fn allowed_endpoint_hosts_replace_the_default_list() {
        let cli = parse(&[
            "run",
            "--public-url",
            "https://x.example",
            "--allowed-endpoint-hosts",
            "authentication.logmeininc.com,auth.eu.example:8443",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        let hosts: Vec<String> = args
            .allowed_endpoint_hosts
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            hosts,
            ["authentication.logmeininc.com", "auth.eu.example:8443"]
        );
    }
}
