//! The local demo: the real operator binary against the in-memory Kubernetes API server and the
//! fake GoTo provider, so anyone can watch the whole life of a token (link → consent → Secret →
//! refresh) in under a minute, with no cluster and no GoTo account.
//!
//! Run it with `bash scripts/demo.sh` (which builds the operator binary first). `--interactive`
//! lets you click Allow on the fake GoTo page in your own browser, on this machine or on another
//! one through an SSH port forward: the operator and the fake GoTo then listen on fixed ports of
//! 127.0.0.1 ([`DEFAULT_PORT`], [`DEFAULT_GOTO_PORT`]; `--port`, `--goto-port`), which the demo
//! prints with the forwarding command. `--verbose` shows the operator's log. Tokens are never
//! printed: only a prefix, the length and a short fingerprint, which is enough to see that a
//! refresh replaced the access token.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use fake_apiserver::FakeApiServer;
use fake_goto::{ClientRegistration, Decision, FakeGoTo, FakeGoToConfig, sample_client_secret};
use goto_oauth_operator::resource::{ClientSecretRef, GoToOAuthClient, GoToOAuthClientSpec};
use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, CustomResourceExt,
    api::{ObjectMeta, PostParams},
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

const NAMESPACE: &str = "demo";
const CLIENT_NAME: &str = "goto-admin-api";
const CREDENTIALS_SECRET: &str = "goto-credentials";
const CLIENT_ID: &str = "5d1c0f6e-7b2a-4c39-9e8d-0demo0client";
const SCOPES: [&str; 2] = ["identity:", "call-control.v1.calls.control"];
/// Access-token lifetime the fake GoTo hands out: short, so a refresh happens within the demo.
const TOKEN_LIFETIME_SECS: u64 = 60;
const REFRESH_BEFORE: &str = "20s";
/// Deadline for every step that needs no human.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// How long `--interactive` waits for someone to click Allow.
const INTERACTIVE_DEADLINE: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(250);
/// Secret keys that hold token-grade values: shown masked only.
const TOKEN_KEYS: [&str; 2] = ["access_token", "refresh_token"];
/// Operator log lines kept to print when the demo fails.
const LOG_TAIL: usize = 40;
/// The operator's authorize/callback port with `--interactive` (without it: a free port). Fixed,
/// so that it can be forwarded to a browser on another machine.
const DEFAULT_PORT: u16 = 18080;
/// The fake GoTo's port with `--interactive` (without it: a free port).
const DEFAULT_GOTO_PORT: u16 = 18081;

/// Local demo of goto-oauth-operator: no cluster, no GoTo account.
#[derive(Parser, Debug)]
#[command(name = "demo")]
struct Args {
    /// Open the authorization link in your own browser and click Allow on the fake GoTo page,
    /// instead of letting the demo act as the browser.
    #[arg(long)]
    interactive: bool,
    /// Show the operator's log lines (prefixed `operator |`).
    #[arg(long)]
    verbose: bool,
    /// Port of 127.0.0.1 for the operator's link and /callback [default: 18080 with
    /// --interactive, otherwise a free port].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Port of 127.0.0.1 for the fake GoTo's consent page and token endpoint [default: 18081 with
    /// --interactive, otherwise a free port].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    goto_port: Option<u16>,
    /// The operator binary (default: `goto-oauth-operator` next to this demo's build directory).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let log = OperatorLog::new(args.verbose);
    match run(&args, log.clone(), None).await {
        Ok(()) => {
            println!("\nDemo finished.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            if !args.verbose {
                let tail = log.tail();
                if !tail.is_empty() {
                    eprintln!("\nlast operator log lines:");
                    for line in tail {
                        eprintln!("operator | {line}");
                    }
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo. `remote_browser` is for the tests: with `--interactive`, the link is also sent
/// there, to a scripted browser that reaches the demo only through the printed ports.
async fn run(
    args: &Args,
    log: OperatorLog,
    remote_browser: Option<oneshot::Sender<String>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // First, so that a taken port fails at once, naming the option that picks another.
    let ports = Ports::choose(args)?;
    let operator_bin = match &args.operator_bin {
        Some(path) => path.clone(),
        None => default_operator_bin()?,
    };
    if !operator_bin.is_file() {
        bail!(
            "operator binary {} not found; build it with `cargo build --bin goto-oauth-operator` \
             (scripts/demo.sh does this)",
            operator_bin.display()
        );
    }

    step(1, "Starting the in-memory Kubernetes API server");
    let apiserver = FakeApiServer::start().await;
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, apiserver.kubeconfig_yaml()).context("write the kubeconfig")?;
    let client = apiserver.client();
    info(format!(
        "API server at {} (kubeconfig: {})",
        apiserver.url(),
        kubeconfig.display()
    ));

    step(2, "Starting the fake GoTo OAuth provider");
    let port = ports.operator;
    let metrics_port = free_port()?;
    let public_url = format!("http://127.0.0.1:{port}");
    let goto = FakeGoTo::start_on(
        SocketAddr::from(([127, 0, 0, 1], ports.goto)),
        FakeGoToConfig {
            expires_in: TOKEN_LIFETIME_SECS,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| port_error(ports.goto, "the fake GoTo", "--goto-port", &e))?;
    // What an admin does once in GoTo's developer portal: register the client, its redirect URI
    // (byte for byte what the operator sends) and the scopes it may ask for.
    let client_secret = sample_client_secret();
    goto.register_client(ClientRegistration {
        client_id: CLIENT_ID.to_string(),
        client_secret: client_secret.clone(),
        redirect_uris: vec![format!("{public_url}/callback")],
        scopes: SCOPES.iter().map(|s| s.to_string()).collect(),
        name: "Demo Admin API client".to_string(),
    });
    info(format!("authorize endpoint: {}", goto.authorize_url()));
    info(format!("token endpoint:     {}", goto.token_url()));
    info(format!(
        "registered OAuth client {CLIENT_ID} with redirect URI {public_url}/callback; tokens live {TOKEN_LIFETIME_SECS}s"
    ));

    step(3, "Installing the CRD and creating the demo resources");
    install_crd(&client).await?;
    create_resources(&client, &client_secret).await?;
    info(format!("namespace/{NAMESPACE}"));
    info(format!("secret/{CREDENTIALS_SECRET} (key clientSecret)"));
    info(format!(
        "gotooauthclient/{CLIENT_NAME} (clientId {CLIENT_ID}, scopes {}, refreshBefore {REFRESH_BEFORE})",
        SCOPES.join(" ")
    ));

    step(4, "Starting the operator");
    let cmd_args = vec![
        "run".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
        "--public-url".into(),
        public_url.clone(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--operator-namespace".into(),
        NAMESPACE.into(),
        "--authorize-url".into(),
        goto.authorize_url(),
        "--token-url".into(),
        goto.token_url(),
        "--leader-election=false".into(),
    ];
    info(format!(
        "{} {}",
        operator_bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("goto-oauth-operator"),
        cmd_args.join(" ")
    ));
    let mut operator = Operator::spawn(&operator_bin, &cmd_args, &kubeconfig, args.verbose, log)?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .context("build the HTTP client")?;
    let healthz = format!("http://127.0.0.1:{metrics_port}/healthz");
    operator
        .eventually("the operator to serve /healthz", STEP_DEADLINE, || async {
            let response = http.get(&healthz).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await?;
    info(format!(
        "operator is up: authorize/callback on {public_url}, metrics on 127.0.0.1:{metrics_port}"
    ));

    let clients: Api<GoToOAuthClient> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);

    step(
        5,
        "Waiting for the authorization link (status.authorizationUrl)",
    );
    let link = operator
        .eventually("status.authorizationUrl", STEP_DEADLINE, || async {
            let obj = clients.get(CLIENT_NAME).await.ok()?;
            obj.status?.authorization_url.filter(|u| !u.is_empty())
        })
        .await?;
    let obj = clients
        .get(CLIENT_NAME)
        .await
        .context("read the GoToOAuthClient")?;
    print_status(&obj);
    if args.interactive {
        print_forwarding(&ports);
    }
    println!("\n  Link for the GoTo admin:\n    {link}\n");

    if args.interactive {
        step(6, "Waiting for you to authorize in a browser");
        println!(
            "  1. Open the link above, exactly as printed, in a browser on this machine or on"
        );
        println!("     the machine that forwards the two ports (see above).");
        println!("  2. The operator sends you on to the fake GoTo consent page; click \"Allow\".");
        println!("  3. GoTo sends you back to the operator's /callback, which stores the tokens.");
        println!(
            "  Waiting up to {} minutes (Ctrl-C to stop)…",
            INTERACTIVE_DEADLINE.as_secs() / 60
        );
        if let Some(browser) = remote_browser {
            let _ = browser.send(link.clone());
        }
        wait_interactive(&mut operator, &clients).await?;
    } else {
        step(6, "Authorizing as the GoTo admin's browser would");
        browse_consent(&http, &goto, &link).await?;
    }

    step(7, "Tokens stored: the Secret and the status");
    let obj = operator
        .eventually("Ready=True", STEP_DEADLINE, || async {
            let obj = clients.get(CLIENT_NAME).await.ok()?;
            let ready = obj.condition("Ready")?;
            (ready.status == "True").then_some(obj)
        })
        .await?;
    let secret_name = obj.target_secret_name();
    let secret = operator
        .eventually("the token Secret", STEP_DEADLINE, || async {
            secrets.get_opt(&secret_name).await.ok().flatten()
        })
        .await?;
    print_status(&obj);
    print_secret(&secret);
    let first_token = secret_value(&secret, "access_token")
        .ok_or_else(|| anyhow!("secret/{secret_name} has no access_token"))?;
    let first_refresh_token = secret_value(&secret, "refresh_token");
    let first_refresh_time = obj
        .status
        .as_ref()
        .and_then(|s| s.last_refresh_time.clone())
        .map(|t| t.0);

    step(8, "Waiting for the operator to refresh the access token");
    let due = obj
        .status
        .as_ref()
        .and_then(|s| s.next_refresh_time.clone())
        .map(|t| t.0);
    let wait_for = match due {
        Some(due) => {
            let secs = due.duration_since(Timestamp::now()).as_secs().max(0);
            info(format!("next refresh scheduled at {due} (in ~{secs}s)"));
            Duration::from_secs(u64::try_from(secs).unwrap_or(0)) + STEP_DEADLINE
        }
        None => bail!("status.nextRefreshTime is not set after authorization"),
    };
    let mut last_progress = Instant::now();
    let refreshed = operator
        .eventually("the access token to be refreshed", wait_for, || {
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                let left = due
                    .map(|d| d.duration_since(Timestamp::now()).as_secs())
                    .unwrap_or(0);
                if left > 0 {
                    info(format!("… refresh due in ~{left}s"));
                } else {
                    info("… refresh due now");
                }
            }
            let first_token = &first_token;
            let secrets = &secrets;
            let clients = &clients;
            let secret_name = &secret_name;
            async move {
                let secret = secrets.get_opt(secret_name).await.ok().flatten()?;
                let token = secret_value(&secret, "access_token")?;
                if token == *first_token {
                    return None;
                }
                let obj = clients.get(CLIENT_NAME).await.ok()?;
                let last = obj.status.as_ref()?.last_refresh_time.clone()?.0;
                (Some(last) > first_refresh_time).then_some((obj, secret))
            }
        })
        .await?;
    let (obj, secret) = refreshed;
    info("refreshed: the access token in the Secret changed and lastRefreshTime moved");
    if secret_value(&secret, "refresh_token") == first_refresh_token {
        // GoTo's current behaviour: a refresh response carries no new refresh token.
        info("GoTo returned no new refresh token, so the operator kept the old one");
    } else {
        info("GoTo returned a new refresh token; the operator stored it");
    }
    print_status(&obj);
    print_secret(&secret);
    print_token_requests(&goto);

    step(9, "Stopping the operator (SIGTERM)");
    let status = operator.terminate().await?;
    if !status.success() {
        bail!("the operator exited with {status} after SIGTERM");
    }
    info(format!("operator exited cleanly ({status})"));
    info(format!("demo took {}s", started.elapsed().as_secs()));
    Ok(())
}

/// `target/debug/examples/demo` → `target/debug/goto-oauth-operator`.
fn default_operator_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the demo executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("cannot find the build directory of {}", exe.display()))?;
    Ok(profile_dir.join(format!(
        "goto-oauth-operator{}",
        std::env::consts::EXE_SUFFIX
    )))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr().context("find a free port")?.port())
}

/// The two ports a browser needs: the operator's (link and /callback) and the fake GoTo's
/// (consent page). Both on 127.0.0.1 only.
#[derive(Debug, PartialEq, Eq)]
struct Ports {
    operator: u16,
    goto: u16,
}

impl Ports {
    /// `--port`/`--goto-port`, else the fixed defaults with `--interactive`, else free ports.
    /// Fails when a port is taken, or both are the same.
    fn choose(args: &Args) -> anyhow::Result<Ports> {
        let pick = |given: Option<u16>, default: u16| match given {
            Some(port) => Ok(port),
            None if args.interactive => Ok(default),
            None => free_port(),
        };
        let ports = Ports {
            operator: pick(args.port, DEFAULT_PORT)?,
            goto: pick(args.goto_port, DEFAULT_GOTO_PORT)?,
        };
        if ports.operator == ports.goto {
            bail!(
                "--port and --goto-port are both {}: the operator and the fake GoTo need a port each",
                ports.operator
            );
        }
        // The operator binds its port itself, later; find out now that it would fail. (The fake
        // GoTo's port is bound for good in step 2 and checked here only to fail before any work.)
        ensure_free(ports.operator, "the operator", "--port")?;
        ensure_free(ports.goto, "the fake GoTo", "--goto-port")?;
        Ok(ports)
    }
}

fn ensure_free(port: u16, who: &str, flag: &str) -> anyhow::Result<()> {
    std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .map(drop)
        .map_err(|e| port_error(port, who, flag, &e))
}

fn port_error(port: u16, who: &str, flag: &str, error: &std::io::Error) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        anyhow!(
            "port {port} of 127.0.0.1, for {who}, is in use (by another program or another demo); \
             choose another with {flag} PORT"
        )
    } else {
        anyhow!(
            "cannot listen on 127.0.0.1:{port} for {who} ({error}); choose another with {flag} PORT"
        )
    }
}

/// What a browser on another machine needs: both ports forwarded to the same ports of its own
/// 127.0.0.1, and the link used as printed.
fn print_forwarding(ports: &Ports) {
    let Ports { operator, goto } = ports;
    let user = std::env::var("USER").unwrap_or_else(|_| "you".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this-machine".into());
    println!(
        "\n  A browser needs two ports of 127.0.0.1 on this machine (nothing listens elsewhere):"
    );
    println!("    {operator:<5}  the operator: the link and /callback      (change with --port)");
    println!("    {goto:<5}  the fake GoTo: the consent page            (change with --goto-port)");
    println!(
        "  Browser on another machine? Forward both, to the same port numbers, from that machine:"
    );
    println!(
        "    ssh -N -L {operator}:127.0.0.1:{operator} -L {goto}:127.0.0.1:{goto} {user}@{host}"
    );
    println!("  (with the name or address you reach this machine by), then open the link there");
    println!(
        "  exactly as printed: http://127.0.0.1 and these port numbers, not localhost or another"
    );
    println!(
        "  name. The operator and the fake GoTo send the browser on to these exact URLs (GoTo"
    );
    println!(
        "  compares the registered redirect URI byte for byte), and the cookie that binds the"
    );
    println!("  attempt to your browser only comes back to the host it was set for.");
}

fn step(n: u32, what: &str) {
    println!("\n[{n}/9] {what}");
}

fn info(message: impl AsRef<str>) {
    println!("  {}", message.as_ref());
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    fake_apiserver::install_crd(
        client,
        GoToOAuthClient::crd(),
        "goto-oauth-demo",
        STEP_DEADLINE,
    )
    .await
    .map_err(|e| anyhow!(e))
}

async fn create_resources(client: &Client, client_secret: &str) -> anyhow::Result<()> {
    fake_apiserver::create_namespace(client, NAMESPACE)
        .await
        .map_err(|e| anyhow!(e))?;

    // `kubectl create secret generic goto-credentials --from-literal=clientSecret=...`
    let credentials = Secret {
        metadata: ObjectMeta {
            name: Some(CREDENTIALS_SECRET.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "clientSecret".to_string(),
            ByteString(client_secret.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credentials)
        .await
        .with_context(|| format!("create secret {CREDENTIALS_SECRET}"))?;

    let spec = GoToOAuthClientSpec {
        client_id: CLIENT_ID.into(),
        client_secret_ref: ClientSecretRef {
            name: CREDENTIALS_SECRET.into(),
            key: "clientSecret".into(),
        },
        redirect_uri: None,
        scopes: SCOPES.iter().map(|s| s.to_string()).collect(),
        secret_name: None,
        refresh_before: Some(REFRESH_BEFORE.into()),
        endpoints: None,
        secret_template: None,
        expected_account: None,
        display_name: Some("Demo app".into()),
        rollout_restart_targets: Vec::new(),
        rollout_restart_on: None,
        rollout_restart_min_interval: None,
        personal_access_token_ref: None,
    };
    Api::<GoToOAuthClient>::namespaced(client.clone(), NAMESPACE)
        .create(
            &PostParams::default(),
            &GoToOAuthClient::new(CLIENT_NAME, spec),
        )
        .await
        .with_context(|| format!("create gotooauthclient {CLIENT_NAME}"))?;
    Ok(())
}

/// Does what the GoTo admin's browser does: open the link (the operator sets a cookie that binds
/// the attempt to this browser and redirects to GoTo), click Allow at GoTo, and follow GoTo's
/// redirect back to the operator's callback with the cookie.
async fn browse_consent(http: &reqwest::Client, goto: &FakeGoTo, link: &str) -> anyhow::Result<()> {
    let opened = http
        .get(link)
        .send()
        .await
        .context("open the authorization link")?;
    if opened.status() != reqwest::StatusCode::FOUND {
        let status = opened.status();
        let body = opened.text().await.unwrap_or_default();
        bail!(
            "the authorization link answered {status} instead of a redirect to GoTo: {}",
            page_title(&body)
        );
    }
    let location = header(&opened, reqwest::header::LOCATION)
        .ok_or_else(|| anyhow!("the authorization link redirected without a Location"))?;
    let cookie = opened
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(str::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if cookie.is_empty() {
        bail!("the authorization link set no binding cookie");
    }
    info(format!(
        "GET link → 302 to GoTo ({}), binding cookie set",
        without_query(&location)
    ));

    let callback = goto
        .consent(&location, Decision::Allow)
        .await
        .map_err(|e| anyhow!("consent at the fake GoTo failed: {e}"))?;
    // The callback URL carries the one-time code: print it without the query.
    info(format!(
        "clicked Allow at GoTo → 302 to {}?code=…&state=…",
        without_query(&callback)
    ));

    let result = http
        .get(&callback)
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await
        .context("follow GoTo's redirect to the callback")?;
    let status = result.status();
    let body = result.text().await.context("read the callback page")?;
    info(format!(
        "GET callback → {status}: page title \"{}\"",
        page_title(&body)
    ));
    if !status.is_success() {
        bail!("the callback answered {status}: {}", page_title(&body));
    }
    Ok(())
}

/// Waits until someone clicks Allow in a real browser, reporting consent failures as they happen.
async fn wait_interactive(
    operator: &mut Operator,
    clients: &Api<GoToOAuthClient>,
) -> anyhow::Result<()> {
    // Shared by reference with each poll's future, which outlives a plain `&mut` borrow.
    let last_reason = std::cell::RefCell::new(String::new());
    operator
        .eventually(
            "someone to authorize in the browser",
            INTERACTIVE_DEADLINE,
            || {
                let last_reason = &last_reason;
                async move {
                    let obj = clients.get(CLIENT_NAME).await.ok()?;
                    let authorized = obj.condition("Authorized")?;
                    if authorized.reason != *last_reason.borrow() {
                        last_reason.replace(authorized.reason.clone());
                        if authorized.status != "True"
                            && authorized.reason != "AwaitingAuthorization"
                        {
                            info(format!(
                                "Authorized={} {}: {} (open the current link again)",
                                authorized.status, authorized.reason, authorized.message
                            ));
                            if let Some(link) = obj
                                .status
                                .as_ref()
                                .and_then(|s| s.authorization_url.as_deref())
                            {
                                info(format!("current link: {link}"));
                            }
                        }
                    }
                    (authorized.status == "True").then_some(())
                }
            },
        )
        .await
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)?
        .to_str()
        .ok()
        .map(str::to_string)
}

fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn page_title(html: &str) -> String {
    let title = html
        .split_once("<title>")
        .and_then(|(_, rest)| rest.split_once("</title>"))
        .map(|(title, _)| title.trim().to_string());
    title.unwrap_or_else(|| "(no title)".to_string())
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// `eyJr…(1024 chars, sha256 1a2b3c4d)`: enough to see that a token changed, useless to an attacker.
fn mask(value: &str) -> String {
    let prefix: String = value.chars().take(4).collect();
    let digest = Sha256::digest(value.as_bytes());
    let fingerprint: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!(
        "{prefix}…({} chars, sha256 {fingerprint})",
        value.chars().count()
    )
}

fn print_secret(secret: &Secret) {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    println!(
        "\n  secret/{name} (values of {} masked):",
        TOKEN_KEYS.join(", ")
    );
    let Some(data) = &secret.data else {
        println!("    (no data)");
        return;
    };
    for (key, value) in data {
        let text = String::from_utf8_lossy(&value.0);
        if TOKEN_KEYS.contains(&key.as_str()) {
            println!("    {key:<14} {}", mask(&text));
        } else {
            println!("    {key:<14} {text}");
        }
    }
}

/// Like `kubectl get gotoclient` plus the interesting part of `-o yaml`.
fn print_status(obj: &GoToOAuthClient) {
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let ready_reason = obj
        .condition("Ready")
        .map(|c| c.reason.as_str())
        .unwrap_or("-");
    let Some(status) = &obj.status else {
        println!("\n  gotooauthclient/{name}: no status yet");
        return;
    };
    let now = Timestamp::now();
    let when = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| match t {
        Some(t) => {
            let secs = t.0.duration_since(now).as_secs();
            let rel = if secs > 0 {
                format!("in {secs}s")
            } else {
                format!("{}s ago", -secs)
            };
            format!("{} ({rel})", t.0)
        }
        None => "-".to_string(),
    };
    let expires = status
        .access_token_expires_at
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| "-".into());
    let name_w = name.len().max(4);
    let ready_w = ready_reason.len().max(5);
    println!("\n  {:<name_w$}   {:<ready_w$}   EXPIRES", "NAME", "READY");
    println!("  {name:<name_w$}   {ready_reason:<ready_w$}   {expires}");
    println!("  conditions:");
    for c in &status.conditions {
        println!(
            "    {:<10} {:<5} {:<22} {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    println!(
        "  accessTokenExpiresAt: {}",
        when(&status.access_token_expires_at)
    );
    println!(
        "  lastRefreshTime:      {}",
        when(&status.last_refresh_time)
    );
    println!(
        "  nextRefreshTime:      {}",
        when(&status.next_refresh_time)
    );
    let field = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("  principal:            {}", field(&status.principal));
    println!("  accountKey:           {}", field(&status.account_key));
    println!("  organizerKey:         {}", field(&status.organizer_key));
    println!("  secretName:           {}", field(&status.secret_name));
}

fn print_token_requests(goto: &FakeGoTo) {
    let mut counts: BTreeMap<(String, u16), usize> = BTreeMap::new();
    for r in goto.token_requests() {
        let grant = r.grant_type.unwrap_or_else(|| "-".into());
        *counts.entry((grant, r.status)).or_default() += 1;
    }
    println!("\n  requests the fake GoTo token endpoint received:");
    for ((grant, status), n) in counts {
        println!("    grant_type={grant:<20} HTTP {status}  ×{n}");
    }
}

/// The operator's log: printed as it arrives with `--verbose`, otherwise kept for a failure report.
#[derive(Clone)]
struct OperatorLog {
    verbose: bool,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl OperatorLog {
    fn new(verbose: bool) -> Self {
        Self {
            verbose,
            tail: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    fn push(&self, line: String) {
        if self.verbose {
            println!("operator | {line}");
        }
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    fn tail(&self) -> Vec<String> {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        tail.iter().cloned().collect()
    }

    fn follow(&self, stream: impl AsyncRead + Unpin + Send + 'static) {
        let log = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.push(line);
            }
        });
    }
}

/// The operator child process. Dropping it kills the process, so a failed demo leaves nothing behind.
struct Operator {
    child: Child,
}

impl Operator {
    fn spawn(
        bin: &Path,
        args: &[String],
        kubeconfig: &Path,
        verbose: bool,
        log: OperatorLog,
    ) -> anyhow::Result<Self> {
        let rust_log = if verbose {
            "info,goto_oauth_operator=debug"
        } else {
            "info"
        };
        let mut child = Command::new(bin)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        if let Some(out) = child.stdout.take() {
            log.follow(out);
        }
        if let Some(err) = child.stderr.take() {
            log.follow(err);
        }
        Ok(Self { child })
    }

    /// Polls `check` until it yields a value; fails at the deadline or as soon as the operator exits.
    async fn eventually<T, F, Fut>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("check the operator process")?
            {
                bail!("the operator exited ({status}) while waiting for {what}");
            }
            if let Some(value) = check().await {
                return Ok(value);
            }
            if start.elapsed() >= deadline {
                bail!("timed out after {}s waiting for {what}", deadline.as_secs());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then wait for the exit (the operator finishes in-flight work and stops serving).
    async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("the operator has already exited"))?;
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .context("run kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed ({sent})");
        }
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .map_err(|_| anyhow!("the operator did not exit within 20s of SIGTERM"))?
            .context("wait for the operator")
    }
}

// `cargo test --all-targets` (CI's command) runs these; alone: `cargo build --bin
// goto-oauth-operator && cargo test --example demo`. Every port here is a free one, never the
// fixed defaults, so that the tests do not collide with a demo someone is running.
#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("demo").chain(extra.iter().copied()))
            .expect("valid arguments")
    }

    fn port_arg(port: u16) -> String {
        port.to_string()
    }

    /// Two distinct free ports (both held while choosing, so they differ).
    fn two_free_ports() -> (u16, u16) {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (bind(), bind());
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    }

    #[test]
    fn interactive_ports_are_fixed_by_default_and_overridable() {
        let a = args(&["--interactive"]);
        assert_eq!((a.port, a.goto_port), (None, None));
        // The defaults themselves may be taken on a shared machine: check the choice, not the bind.
        let pick = |a: &Args| {
            (
                a.port.unwrap_or(DEFAULT_PORT),
                a.goto_port.unwrap_or(DEFAULT_GOTO_PORT),
            )
        };
        assert_eq!(pick(&a), (18080, 18081));
        let (p, q) = two_free_ports();
        let a = args(&[
            "--interactive",
            "--port",
            &port_arg(p),
            "--goto-port",
            &port_arg(q),
        ]);
        assert_eq!(
            Ports::choose(&a).unwrap(),
            Ports {
                operator: p,
                goto: q
            }
        );
        assert!(Args::try_parse_from(["demo", "--port", "0"]).is_err());
        assert!(Args::try_parse_from(["demo", "--goto-port", "65536"]).is_err());
    }

    #[test]
    fn without_interactive_the_ports_are_free_ones() {
        let ports = Ports::choose(&args(&[])).unwrap();
        assert_ne!(ports.operator, ports.goto);
    }

    #[test]
    fn same_port_twice_is_refused() {
        let p = port_arg(free_port().unwrap());
        let e = Ports::choose(&args(&["--port", &p, "--goto-port", &p])).unwrap_err();
        assert!(
            format!("{e}").contains("--port and --goto-port are both"),
            "{e}"
        );
    }

    /// A taken port fails before the demo starts anything, with the option that picks another.
    #[tokio::test]
    async fn a_taken_port_fails_naming_its_option() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = port_arg(taken.local_addr().unwrap().port());
        let free = port_arg(free_port().unwrap());
        for (flag, other) in [("--port", "--goto-port"), ("--goto-port", "--port")] {
            let a = args(&["--interactive", flag, &taken_port, other, &free]);
            let error = run(&a, OperatorLog::new(false), None)
                .await
                .expect_err("a taken port fails the demo");
            let text = format!("{error:#}");
            assert!(
                text.contains(&format!("port {taken_port} of 127.0.0.1"))
                    && text.contains("is in use")
                    && text.contains(&format!("choose another with {flag} PORT")),
                "{text}"
            );
        }
    }

    /// `--interactive` with a browser that reaches the demo only through the two printed ports of
    /// 127.0.0.1, as one on another machine does through `ssh -L`: every URL it is sent to is on
    /// one of them, the consent completes, and the demo goes on to the end (refresh and stop).
    /// The only test of the whole demo; about 40 s, most of it waiting for the refresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interactive_consent_through_the_printed_ports() {
        let (p, q) = two_free_ports();
        let a = args(&[
            "--interactive",
            "--port",
            &port_arg(p),
            "--goto-port",
            &port_arg(q),
        ]);
        let (link_tx, link_rx) = oneshot::channel();
        let log = OperatorLog::new(false);
        let demo = run(&a, log.clone(), Some(link_tx));
        let browser = remote_browser(link_rx, p, q);
        let (outcome, browsed) = tokio::time::timeout(Duration::from_secs(180), async {
            tokio::join!(demo, browser)
        })
        .await
        .expect("the demo finishes within 180 s");
        let log = log.tail().join("\n");
        if let Err(e) = browsed {
            panic!("browser: {e}; demo: {outcome:?}; operator log:\n{log}");
        }
        if let Err(e) = outcome {
            panic!("the demo failed after the consent: {e:#}; operator log:\n{log}");
        }
    }

    /// The admin's browser, given only the link: open it, Allow at GoTo, follow the redirect
    /// back with the binding cookie. Checks that it is never sent off the two ports.
    async fn remote_browser(
        link: oneshot::Receiver<String>,
        operator_port: u16,
        goto_port: u16,
    ) -> Result<(), String> {
        let link = link.await.map_err(|_| "the demo printed no link")?;
        let operator = format!("http://127.0.0.1:{operator_port}/");
        let goto = format!("http://127.0.0.1:{goto_port}/");
        let on = |url: &str, base: &str| {
            if url.starts_with(base) {
                Ok(())
            } else {
                Err(format!("sent to {url}, not under {base}"))
            }
        };
        on(&link, &operator)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let opened = http.get(&link).send().await.map_err(|e| e.to_string())?;
        if opened.status() != reqwest::StatusCode::FOUND {
            return Err(format!("the link answered {}", opened.status()));
        }
        let cookies: Vec<String> = opened
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|c| c.to_str().ok()?.split(';').next().map(str::to_string))
            .collect();
        let at_goto = header(&opened, reqwest::header::LOCATION).ok_or("no Location")?;
        on(&at_goto, &goto)?;
        let callback = fake_goto::consent(&at_goto, Decision::Allow).await?;
        on(&callback, &format!("{operator}callback?"))?;
        let done = http
            .get(&callback)
            .header(reqwest::header::COOKIE, cookies.join("; "))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = done.status();
        let body = done.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "/callback answered {status}: {}",
                page_title(&body)
            ));
        }
        Ok(())
    }
}
