//! `cargo bench --bench operator`: the real operator binary against 1,000 clients (or more).
//!
//! The operator runs as a child process (the release-profile binary, as deployed) against the
//! in-memory API server and the fake GoTo provider, both hosted in this process. The operator
//! and this process reach the API server through `kube-fault-proxy` (no faults are injected; the
//! proxy costs one more loopback hop per request). Requests are counted twice: by the proxy's
//! request log and by the in-memory API server's own, side by side, and where the two differ the
//! report says why. What is measured is mostly counted, not timed — API requests by verb, writes,
//! 429s — because counts do not depend on how busy the (shared, 2-core) machine is; the times and
//! RSS figures are printed alongside. See BENCHMARKS.md for the phases and the results.
//!
//! With `GOTO_OAUTH_BENCH_REAL_CLUSTER=1` and `KUBECONFIG` the proxy sits in front of that
//! cluster instead: everything happens in a fresh namespace, deleted at the end, and only the
//! proxy's counts are reported.
//!
//! Set-up skips the consent flow: tokens come straight from the fake provider and each client's
//! token Secret is pre-created exactly as the operator would write it (`desired_secret`, applied
//! under the operator's field manager), so the phases measure the steady-state operator, not the
//! deliberately rate-limited code exchange. The consent phase then runs a few real consents.
//!
//! Without `--bench` (i.e. under `cargo test --all-targets`) it only prints a line and exits.
//!
//! Environment knobs: see `Settings::from_env` and BENCHMARKS.md ("How to run").

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use fake_apiserver::FakeApiServer;
use fake_goto::{ClientRegistration, Decision, FakeGoTo, FakeGoToConfig};
use futures::{StreamExt, TryStreamExt, stream};
use goto_oauth_operator::{
    goto::protocol::{TokenResponse, basic_authorization},
    resource::{FORCE_REFRESH_ANNOTATION, GoToOAuthClient, MANAGER},
    secret::{ACCESS_TOKEN_KEY, StoredTokens, desired_secret},
    validation::{Defaults, validate},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client, CustomResourceExt, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use kube_fault_proxy::FaultProxy;
use secrecy::ExposeSecret;

/// Requests this process sends carry this User-Agent, so the request logs separate them from
/// the operator's (kube-rs sends none by default).
const BENCH_UA: &str = "goto-oauth-bench";
/// The namespace on the in-memory API server; a real cluster gets a fresh one per run.
const FAKE_NAMESPACE: &str = "bench";
/// Parallel set-up requests (API objects, code exchanges): enough to keep the in-process
/// servers busy on 2 cores without queueing thousands of requests.
const SETUP_CONCURRENCY: usize = 16;
/// GoTo's documented token-endpoint limit.
const PROVIDER_RATE_LIMIT: u32 = 10;
/// Size of the data of each unrelated Secret.
const UNRELATED_BYTES: usize = 10 * 1024;
/// Page size of the bench's own LISTs.
const PAGE: u32 = 500;

fn main() -> std::process::ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark: run with `cargo bench --bench operator`");
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("benchmark: cannot build the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings

/// What one run does, from the environment.
struct Settings {
    /// `BENCH_CLIENTS` (default 1000): authorized clients at start-up.
    clients: usize,
    /// `BENCH_IDLE_SECS` (default 30): the idle window of phase 2.
    idle_secs: u64,
    /// `BENCH_SKIP_STORM=1`: stop after phase 2c.
    skip_storm: bool,
    /// `BENCH_STORM_CLIENTS` (default `BENCH_CLIENTS`, not fewer): due clients in the storm;
    /// the bench adds clients before the storm to reach it.
    storm_clients: usize,
    /// `BENCH_UNRELATED_SECRETS` (default 2): Secrets of 10 KB per client that the operator
    /// neither owns nor references, in the watched namespace.
    unrelated_per_client: usize,
    /// `BENCH_CONSENTS` (default 20): consents through the HTTP flow in phase 2c.
    consents: usize,
    /// `BENCH_LEADER_ELECTION=1`: run the operator with leader election (a Lease), as deployed.
    leader_election: bool,
    /// `GOTO_OAUTH_BENCH_REAL_CLUSTER=1` with `KUBECONFIG`: the cluster, not the in-memory server.
    real_cluster: bool,
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn env_count(name: &str, default: usize) -> Result<usize> {
    Ok(usize::try_from(env_number(name, default as u64)?)?)
}

/// Set, and neither empty nor `0`.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let clients = env_count("BENCH_CLIENTS", 1000)?;
        let storm_clients = env_count("BENCH_STORM_CLIENTS", clients)?;
        if storm_clients < clients {
            bail!(
                "BENCH_STORM_CLIENTS={storm_clients} is below BENCH_CLIENTS={clients}: the storm \
                 refreshes every client present, so set BENCH_CLIENTS lower instead"
            );
        }
        let real_cluster = std::env::var("GOTO_OAUTH_BENCH_REAL_CLUSTER").as_deref() == Ok("1");
        if real_cluster && std::env::var_os("KUBECONFIG").is_none() {
            bail!("GOTO_OAUTH_BENCH_REAL_CLUSTER=1 needs KUBECONFIG (the cluster to measure)");
        }
        Ok(Settings {
            clients,
            idle_secs: env_number("BENCH_IDLE_SECS", 30)?,
            skip_storm: env_flag("BENCH_SKIP_STORM"),
            storm_clients,
            unrelated_per_client: env_count("BENCH_UNRELATED_SECRETS", 2)?,
            consents: env_count("BENCH_CONSENTS", 20)?,
            leader_election: env_flag("BENCH_LEADER_ELECTION"),
            real_cluster,
        })
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// The environment: API server (in-memory or a cluster) behind the proxy, the fake GoTo

/// One client as set up: its resource (with uid) and the tokens first stored.
struct BenchClient {
    obj: GoToOAuthClient,
    tokens: TokenResponse,
}

/// One request, from either log.
#[derive(Clone, Debug)]
struct Rec {
    method: String,
    verb: String,
    path: String,
    query: String,
    status: u16,
    at: SystemTime,
}

/// The operator's requests in both logs since they were last cleared.
struct Logs {
    /// The in-memory API server's log; `None` on a real cluster.
    fake: Option<Vec<Rec>>,
    proxy: Vec<Rec>,
    cleared_at: SystemTime,
    taken_at: SystemTime,
}

/// Everything the phases share.
struct Bench {
    s: Settings,
    namespace: String,
    /// Counts the requests; the API server behind it lives as long as the bench.
    proxy: FaultProxy,
    /// The in-memory API server (`None` on a real cluster), with its own request log.
    fake: Option<FakeApiServer>,
    goto: FakeGoTo,
    client: Client,
    http: reqwest::Client,
    defaults: Defaults,
    redirect_uri: String,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    port: u16,
    metrics_port: u16,
    clients: Vec<BenchClient>,
    /// Unrelated Secrets created so far.
    unrelated: usize,
    cleared_at: Mutex<SystemTime>,
    /// Memory of the operator with no clients (phase 0).
    baseline: Option<Mem>,
}

/// A kube client (through the proxy) whose requests are tagged with [`BENCH_UA`].
fn bench_client(proxy: &FaultProxy) -> Result<Client> {
    let mut config = kube::Config::new(proxy.url().parse()?);
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(BENCH_UA),
    ));
    Ok(Client::try_from(config)?)
}

fn is_operator(user_agent: Option<&str>) -> bool {
    user_agent != Some(BENCH_UA)
}

impl Bench {
    /// The API server behind the proxy, the namespace, the CRD and the fake provider; no clients.
    async fn start(s: Settings) -> Result<Bench> {
        let (fake, upstream, namespace) = if s.real_cluster {
            let upstream = Client::try_default()
                .await
                .context("a kube client from KUBECONFIG")?;
            let suffix = goto_oauth_operator::consent::random_token(6)
                .to_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "x");
            (None, upstream, format!("goto-oauth-bench-{suffix}"))
        } else {
            let fake = FakeApiServer::start().await;
            let upstream = fake.client();
            (Some(fake), upstream, FAKE_NAMESPACE.to_string())
        };
        let proxy = FaultProxy::start(upstream).await?;
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, proxy.kubeconfig_yaml())?;
        let client = bench_client(&proxy)?;

        // The CRD and the namespace, as the e2e harness installs them.
        fake_apiserver::install_crd(
            &client,
            GoToOAuthClient::crd(),
            "goto-oauth-bench",
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| anyhow!("install the CRD: {e}"))?;
        fake_apiserver::create_namespace(&client, &namespace)
            .await
            .map_err(|e| anyhow!("create the namespace {namespace}: {e}"))?;

        let goto = FakeGoTo::start(FakeGoToConfig::default()).await;
        // Set-up talks to the provider directly and must not wait on GoTo's limit.
        goto.set_rate_limit(None);
        let port = free_port()?;
        let metrics_port = free_port()?;
        let public_url = format!("http://127.0.0.1:{port}");
        let redirect_uri = format!("{public_url}/callback");
        let defaults = Defaults {
            public_url: public_url.parse()?,
            authorize_url: goto.authorize_url().parse()?,
            token_url: goto.token_url().parse()?,
            allowed_hosts: Vec::new(),
        };
        Ok(Bench {
            s,
            namespace,
            proxy,
            fake,
            goto,
            client,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()?,
            defaults,
            redirect_uri,
            dir,
            kubeconfig,
            port,
            metrics_port,
            clients: Vec::new(),
            unrelated: 0,
            cleared_at: Mutex::new(SystemTime::now()),
            baseline: None,
        })
    }

    /// On a real cluster: deletes the namespace (and so everything the bench created) and
    /// waits for it to go. The CRD stays, as after the e2e tests.
    async fn cleanup(&self) -> Result<()> {
        if !self.s.real_cluster {
            return Ok(());
        }
        println!("deleting the namespace {}", self.namespace);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .delete(&self.namespace, &DeleteParams::background())
            .await
            .with_context(|| format!("delete the namespace {}", self.namespace))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while namespaces.get_opt(&self.namespace).await?.is_some() {
            if Instant::now() > deadline {
                bail!(
                    "the namespace {} is still there 300 s after its deletion",
                    self.namespace
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Ok(())
    }

    fn n(&self) -> usize {
        self.clients.len()
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn crs(&self) -> Api<GoToOAuthClient> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn clear_logs(&self) {
        if let Some(fake) = &self.fake {
            fake.clear_request_log();
        }
        self.proxy.clear_request_log();
        *self.cleared_at.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
    }

    /// The operator's requests since the logs were last cleared: the server's log is read
    /// first, so a request answered in between is in the proxy's only.
    fn logs(&self) -> Logs {
        let fake = self.fake.as_ref().map(|f| {
            f.request_log()
                .into_iter()
                .filter(|r| is_operator(r.user_agent.as_deref()))
                .map(|r| Rec {
                    method: r.method,
                    verb: r.verb,
                    path: r.path,
                    query: r.query,
                    status: r.status,
                    at: r.at,
                })
                .collect()
        });
        let proxy = self
            .proxy
            .request_log()
            .into_iter()
            .filter(|r| is_operator(r.user_agent.as_deref()))
            .map(|r| Rec {
                method: r.method,
                verb: r.verb,
                path: r.path,
                query: r.query,
                status: r.status,
                at: r.at,
            })
            .collect();
        Logs {
            fake,
            proxy,
            cleared_at: *self.cleared_at.lock().unwrap_or_else(|e| e.into_inner()),
            taken_at: SystemTime::now(),
        }
    }

    /// The operator's requests in the proxy's log matching `(verb, path, status)`, without
    /// copying the log (the same on a real cluster).
    fn operator_count(&self, f: impl Fn(&str, &str, u16) -> bool) -> usize {
        self.proxy.count_requests(|r| {
            is_operator(r.user_agent.as_deref()) && f(&r.verb, &r.path, r.status)
        })
    }

    /// How often to read the operator's /metrics while waiting: every 250 ms up to 2,500
    /// clients, less often above, as the text grows with the clients (a Prometheus scrapes
    /// every 15–30 s; polling a 10,000-client /metrics 4 times a second would be the load).
    fn metrics_poll(&self) -> Duration {
        Duration::from_millis((self.n() as u64 / 10).clamp(250, 2_000))
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up

/// Registers clients `from..from + count` at the provider and exchanges a code for each, in
/// parallel with the provider's limit off; returns (index, client id, client secret, tokens).
async fn exchange_codes(
    bench: &Bench,
    from: usize,
    count: usize,
) -> Result<Vec<(usize, String, String, TokenResponse)>> {
    let mut out: Vec<(usize, String, String, TokenResponse)> = stream::iter(from..from + count)
        .map(|i| async move {
            let client_id = format!("bench-client-{i:04}");
            let client_secret = fake_goto::sample_client_secret();
            bench.goto.register_client(ClientRegistration {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                redirect_uris: vec![bench.redirect_uri.clone()],
                scopes: vec!["identity:".into(), "call-control.v1.calls.control".into()],
                name: format!("bench {i}"),
            });
            let code = bench
                .goto
                .issue_code(&client_id, &bench.redirect_uri)
                .map_err(|e| anyhow!(e))?;
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "authorization_code")
                .append_pair("code", &code)
                .append_pair("redirect_uri", &bench.redirect_uri)
                .finish();
            let response = bench
                .http
                .post(bench.goto.token_url())
                .header(
                    http::header::AUTHORIZATION,
                    basic_authorization(&client_id, &client_secret),
                )
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            if !status.is_success() {
                bail!("code exchange for {client_id} answered {status}");
            }
            let tokens =
                TokenResponse::from_json(&bytes).map_err(|e| anyhow!("token response: {e}"))?;
            anyhow::Ok((i, client_id, client_secret, tokens))
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    // The operator's peak in-flight token requests is measured later, not the bench's.
    bench.goto.reset_max_in_flight();
    out.sort_by_key(|(i, ..)| *i);
    Ok(out)
}

/// Creates a client's credentials Secret (`<name>-credentials`) and its `GoToOAuthClient`.
async fn create_client_objects(
    bench: &Bench,
    name: &str,
    client_id: &str,
    client_secret: String,
) -> Result<GoToOAuthClient> {
    let creds = Secret {
        metadata: ObjectMeta {
            name: Some(format!("{name}-credentials")),
            ..Default::default()
        },
        string_data: Some([("clientSecret".to_string(), client_secret)].into()),
        ..Default::default()
    };
    bench
        .secrets()
        .create(&PostParams::default(), &creds)
        .await
        .with_context(|| format!("create {name}-credentials"))?;
    let obj: GoToOAuthClient = serde_json::from_value(serde_json::json!({
        "apiVersion": "goto-oauth.dev/v1alpha1",
        "kind": "GoToOAuthClient",
        "metadata": {"name": name},
        "spec": {
            "clientId": client_id,
            "clientSecretRef": {"name": format!("{name}-credentials")},
        },
    }))?;
    bench
        .crs()
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("create the GoToOAuthClient {name}"))
}

/// Adds `count` authorized clients whose tokens are fresh (issued now), and their share of
/// unrelated Secrets.
async fn add_clients(bench: &mut Bench, count: usize) -> Result<()> {
    let from = bench.n();
    let started = Instant::now();
    let registered = exchange_codes(bench, from, count).await?;
    println!(
        "  {count} code exchanges at the provider ({SETUP_CONCURRENCY} at a time): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let b: &Bench = bench;
    let mut added: Vec<BenchClient> = stream::iter(registered)
        .map(|(i, client_id, client_secret, tokens)| async move {
            let name = format!("client-{i:04}");
            let obj = create_client_objects(b, &name, &client_id, client_secret).await?;
            anyhow::Ok(BenchClient { obj, tokens })
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    added.sort_by_key(|c| c.obj.name_any());
    put_token_secrets(bench, &added, Timestamp::now()).await?;
    bench.clients.extend(added);
    bench.clients.shrink_to_fit();
    println!(
        "  {count} × (client Secret, GoToOAuthClient, token Secret) created: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let unrelated = count * bench.s.unrelated_per_client;
    add_unrelated_secrets(bench, unrelated).await?;
    if unrelated > 0 {
        println!(
            "  {unrelated} unrelated Secrets of {} KB created: {:.1} s",
            UNRELATED_BYTES / 1024,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Secrets in the watched namespace that the operator neither owns nor references (other
/// applications' Secrets), each with 10 KB of data.
async fn add_unrelated_secrets(bench: &mut Bench, count: usize) -> Result<()> {
    let from = bench.unrelated;
    // Not compressible, as certificates and keys are not (an xorshift stream).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let blob: Vec<u8> = (0..UNRELATED_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let secrets = bench.secrets();
    stream::iter(from..from + count)
        .map(|i| {
            let secrets = secrets.clone();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(format!("unrelated-{i:05}")),
                    labels: Some([("app".to_string(), "something-else".to_string())].into()),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some([("blob".to_string(), ByteString(blob.clone()))].into()),
                ..Default::default()
            };
            async move {
                secrets.create(&PostParams::default(), &secret).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    bench.unrelated += count;
    Ok(())
}

/// Writes each client's token Secret as the operator would have written it at `issued_at`:
/// the same builder, server-side apply under the operator's field manager.
async fn put_token_secrets(
    bench: &Bench,
    clients: &[BenchClient],
    issued_at: Timestamp,
) -> Result<()> {
    let secrets = bench.secrets();
    stream::iter(clients)
        .map(|c| {
            let secrets = secrets.clone();
            async move {
                let settings =
                    validate(&c.obj, &bench.defaults).map_err(|e| anyhow!("invalid spec: {e}"))?;
                let tokens = StoredTokens::from_response(&c.tokens, None, &settings, issued_at)?;
                let desired = desired_secret(&c.obj, &settings, &tokens);
                let mut value = serde_json::to_value(&desired)?;
                value["apiVersion"] = "v1".into();
                value["kind"] = "Secret".into();
                secrets
                    .patch(
                        &settings.secret_name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(value),
                    )
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Lists every bench client (pages of [`PAGE`]): how many are `Ready=True`, and how many of
/// those also have their next refresh scheduled (`status.nextRefreshTime`).
async fn ready_counts(bench: &Bench) -> Result<(usize, usize)> {
    let crs = bench.crs();
    let mut params = ListParams::default().limit(PAGE);
    let (mut ready, mut scheduled) = (0, 0);
    loop {
        let page = crs.list(&params).await?;
        for c in page
            .items
            .iter()
            .filter(|c| c.name_any().starts_with("client-"))
        {
            if c.condition("Ready").is_some_and(|c| c.status == "True") {
                ready += 1;
                if c.status
                    .as_ref()
                    .is_some_and(|s| s.next_refresh_time.is_some())
                {
                    scheduled += 1;
                }
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok((ready, scheduled)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process

/// Memory of a process from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss: u64,
    anon: u64,
    file: u64,
    hwm: u64,
}

impl Mem {
    fn of(pid: u32) -> Mem {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| proc_field_kib(&status, name).unwrap_or(0);
        Mem {
            rss: field("VmRSS"),
            anon: field("RssAnon"),
            file: field("RssFile"),
            hwm: field("VmHWM"),
        }
    }

    /// "26.8 MiB (anon 15.3 + file 11.4)"
    fn show(&self) -> String {
        format!(
            "{} (anon {} + file {})",
            mib(self.rss),
            mib_bare(self.anon),
            mib_bare(self.file)
        )
    }
}

/// Bytes per client above the operator with no clients: (now − baseline) ÷ n, for anon and
/// VmRSS.
fn per_client(now: Mem, baseline: Option<Mem>, n: usize) -> String {
    let Some(base) = baseline else {
        return "n/a (no 0-client run)".into();
    };
    if n == 0 {
        return "n/a (0 clients)".into();
    }
    let bytes = |now: u64, base: u64| (now as i64 - base as i64) * 1024 / n as i64;
    format!(
        "anon {} B, VmRSS {} B (anon {} → {} MiB over the 0-client run, ÷ {n})",
        bytes(now.anon, base.anon),
        bytes(now.rss, base.rss),
        mib_bare(base.anon),
        mib_bare(now.anon),
    )
}

/// The operator binary as a child process, with an RSS sampler.
struct Operator {
    child: tokio::process::Child,
    pid: u32,
    log_path: PathBuf,
    started: Instant,
    metrics_url: String,
    http: reqwest::Client,
    /// How often /metrics is read while waiting.
    poll: Duration,
    /// Highest VmRSS sampled (KiB), besides the kernel's VmHWM.
    sampled_peak_kib: Arc<Mutex<u64>>,
    /// Most open file descriptors sampled: nearly all are connections to the API server.
    sampled_peak_fds: Arc<Mutex<usize>>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn start(bench: &Bench) -> Result<Operator> {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = bench.dir.path().join(format!("operator-{run}.log"));
        let log = std::fs::File::create(&log_path)?;
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"));
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", bench.port))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", bench.metrics_port))
            .arg("--public-url")
            .arg(bench.defaults.public_url.as_str().trim_end_matches('/'))
            .arg("--namespace")
            .arg(&bench.namespace)
            .arg("--operator-namespace")
            .arg(&bench.namespace)
            .arg("--authorize-url")
            .arg(bench.goto.authorize_url())
            .arg("--token-url")
            .arg(bench.goto.token_url())
            .arg(format!("--leader-election={}", bench.s.leader_election))
            .arg("--pod-name")
            .arg(format!("goto-oauth-bench-{run}"))
            .env("KUBECONFIG", &bench.kubeconfig)
            .env("RUST_LOG", "warn")
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawn the operator")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the operator exited at once"))?;
        let sampled_peak_kib = Arc::new(Mutex::new(0));
        let sampled_peak_fds = Arc::new(Mutex::new(0));
        let sampler = {
            let peak = sampled_peak_kib.clone();
            let peak_fds = sampled_peak_fds.clone();
            tokio::spawn(async move {
                loop {
                    let rss = Mem::of(pid).rss;
                    {
                        let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                        *p = (*p).max(rss);
                    }
                    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                        let fds = dir.count();
                        let mut p = peak_fds.lock().unwrap_or_else(|e| e.into_inner());
                        *p = (*p).max(fds);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let op = Operator {
            child,
            pid,
            log_path,
            started,
            metrics_url: format!("http://127.0.0.1:{}/metrics", bench.metrics_port),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()?,
            poll: bench.metrics_poll(),
            sampled_peak_kib,
            sampled_peak_fds,
            sampler,
        };
        let healthz = format!("http://127.0.0.1:{}/healthz", bench.metrics_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = op.http.get(&healthz).send().await
                && r.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the operator did not serve /healthz within 30 s; log: {}",
                    tail(&op.log_path, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(op)
    }

    fn mem(&self) -> Mem {
        Mem::of(self.pid)
    }

    fn sampled_peak(&self) -> u64 {
        *self
            .sampled_peak_kib
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Peak open file descriptors sampled so far, and the count now.
    fn fds(&self) -> String {
        let now = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let peak = *self
            .sampled_peak_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        format!("peak {peak}, now {now}")
    }

    async fn metrics_text(&self) -> Result<String> {
        Ok(self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?)
    }

    /// A counter or histogram `_count` from /metrics (sum over label sets).
    async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// A histogram's cumulative buckets from /metrics: (upper bound, count), summed over label
    /// sets.
    async fn buckets(&self, name: &str) -> Result<Vec<(f64, f64)>> {
        let text = self.metrics_text().await?;
        let mut out: Vec<(f64, f64)> = Vec::new();
        let prefix = format!("{name}_bucket{{");
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let le = line
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(|v| {
                    if v == "+Inf" {
                        f64::INFINITY
                    } else {
                        v.parse().unwrap_or(f64::NAN)
                    }
                });
            let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(le), Some(count)) = (le, count) {
                match out.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, c)) => *c += count,
                    None => out.push((le, count)),
                }
            }
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(out)
    }

    async fn reconciles(&self) -> Result<u64> {
        Ok(self
            .metric("goto_oauth_reconcile_duration_seconds_count")
            .await? as u64)
    }

    /// Waits until the reconcile count has not moved for `quiet` (at least three reads of
    /// /metrics); returns it.
    async fn settle(&self, quiet: Duration, deadline: Duration) -> Result<u64> {
        let quiet = quiet.max(self.poll * 3);
        let until = Instant::now() + deadline;
        let mut last = self.reconciles().await?;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(self.poll).await;
            let now = self.reconciles().await?;
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet || Instant::now() > until {
                return Ok(now);
            }
        }
    }

    /// SIGTERM, wait for the exit; returns how many WARN/ERROR lines it logged.
    async fn stop(mut self) -> Result<usize> {
        self.sampler.abort();
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    println!(
                        "  operator exited with {status}; log tail:\n{}",
                        tail(&self.log_path, 20)
                    );
                }
            }
            Err(_) => {
                println!("  operator did not exit within 20 s of SIGTERM; killing it");
                self.child.kill().await?;
            }
        }
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        if env_flag("BENCH_SHOW_LOGS") {
            println!("--- operator log ---\n{log}\n--- end ---");
        }
        Ok(log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count())
    }
}

/// User plus system CPU time of `/proc/<pid>` (`self` for the bench), in seconds.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) close with ')': utime and stime
    // are the 12th and 13th after it.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf only reads a system setting.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks
        / if per_second > 0 {
            per_second as f64
        } else {
            100.0
        }
}

fn proc_field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn mib(kib: u64) -> String {
    format!("{} MiB", mib_bare(kib))
}

fn mib_bare(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// "median 1.2 s, max 3.4 s" of some durations.
fn median_max(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    match (sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(median), Some(max)) => format!(
            "median {:.0} ms, max {:.0} ms",
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => "n/a".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Counting requests

/// The resource a path names: `secrets`, `gotooauthclients`, `gotooauthclients/status`,
/// `leases`, `events`, `namespaces`, …; a discovery or other non-resource path as itself.
fn resource_of(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] => rest,
        _ => return path.to_string(),
    };
    let rest = match rest {
        ["namespaces", _, more @ ..] if !more.is_empty() => more,
        other => other,
    };
    match rest {
        [] => path.to_string(),
        [plural] | [plural, _] => (*plural).to_string(),
        [plural, _, sub, ..] => format!("{plural}/{sub}"),
    }
}

/// `verb resource`, e.g. `get secrets`, `patch gotooauthclients/status`, `get /version`.
fn request_kind(r: &Rec) -> String {
    format!("{} {}", r.verb, resource_of(&r.path))
}

/// Writes: create/update/patch/delete on Secrets, on `*/status` or on Events.
fn is_write(r: &Rec) -> bool {
    matches!(
        r.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    ) && (r.path.ends_with("/status") || r.path.contains("/secrets") || r.path.contains("/events"))
}

fn count_by(requests: &[Rec], key: impl Fn(&Rec) -> String) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in requests {
        *out.entry(key(r)).or_insert(0) += 1;
    }
    out
}

/// "get secrets=2.00, patch …" (per `per` when given).
fn format_counts(counts: &BTreeMap<String, usize>, per: Option<usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| match per {
            Some(n) if n > 0 => format!("{k}={:.2}", *v as f64 / n as f64),
            _ => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// LISTs and their pages: `list secrets: 5 (limit=500 on 5, continue on 4)`.
fn list_pages(requests: &[Rec]) -> String {
    let mut by_resource: BTreeMap<String, (usize, BTreeMap<String, usize>, usize)> =
        BTreeMap::new();
    for r in requests.iter().filter(|r| r.verb == "list") {
        let entry = by_resource.entry(resource_of(&r.path)).or_default();
        entry.0 += 1;
        for (k, v) in url::form_urlencoded::parse(r.query.as_bytes()) {
            match k.as_ref() {
                "limit" => *entry.1.entry(v.into_owned()).or_insert(0) += 1,
                "continue" if !v.is_empty() => entry.2 += 1,
                _ => {}
            }
        }
    }
    if by_resource.is_empty() {
        return "none".into();
    }
    by_resource
        .iter()
        .map(|(resource, (n, limits, continued))| {
            let limits = if limits.is_empty() {
                "no limit".to_string()
            } else {
                limits
                    .iter()
                    .map(|(l, c)| format!("limit={l} on {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("{resource}: {n} ({limits}, continue on {continued})")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why requests are in one log and not the other: each unmatched request (same method, path
/// and query), grouped by `kind: reason`.
fn compare(logs: &Logs) -> Vec<String> {
    let Some(fake) = &logs.fake else {
        return Vec::new();
    };
    let key = |r: &Rec| format!("{} {}?{}", r.method, r.path, r.query);
    let unmatched = |these: &[Rec], others: &[Rec]| -> Vec<Rec> {
        let mut left: HashMap<String, usize> = HashMap::new();
        for r in others {
            *left.entry(key(r)).or_insert(0) += 1;
        }
        these
            .iter()
            .filter(|r| match left.get_mut(&key(r)) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            })
            .cloned()
            .collect()
    };
    let near = |a: SystemTime, b: SystemTime, within: Duration| {
        a.duration_since(b)
            .or_else(|_| b.duration_since(a))
            .is_ok_and(|d| d <= within)
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for r in unmatched(&logs.proxy, fake) {
        let why = if r.status == 502 {
            "in the proxy's log only: answered by the proxy itself (API server unreachable), \
             never reached the server"
        } else if near(r.at, logs.cleared_at, Duration::from_secs(2)) {
            "in the proxy's log only: in flight when the logs were cleared (the server logs a \
             request as it answers, the proxy once it has relayed the answer)"
        } else if near(r.at, logs.taken_at, Duration::from_secs(1)) {
            "in the proxy's log only: answered while the logs were being read (the server's \
             is read first)"
        } else if r.verb == "watch" {
            "in the proxy's log only: a watch the server has no record of (unexplained)"
        } else {
            "in the proxy's log only: unexplained"
        };
        *reasons
            .entry(format!("{} {}: {why}", request_kind(&r), r.status))
            .or_insert(0) += 1;
    }
    for r in unmatched(fake, &logs.proxy) {
        let why = if r.verb == "watch" {
            "in the server's log only: a watch whose client went away before the proxy relayed \
             its first answer (the proxy logs a request once it has relayed the answer's head)"
        } else {
            "in the server's log only: the client closed the connection before the proxy \
             relayed the answer, so the proxy never logged it"
        };
        *reasons
            .entry(format!("{} {}: {why}", request_kind(&r), r.status))
            .or_insert(0) += 1;
    }
    reasons
        .into_iter()
        .map(|(what, n)| format!("{n} × {what}"))
        .collect()
}

/// "4,009" style.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Report

/// Result rows and request tables, printed at the end.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
    tables: Vec<String>,
}

impl Report {
    fn row(&mut self, metric: &str, target: &str, value: String) {
        println!(
            "  {metric}: {value}{}",
            if target.is_empty() {
                String::new()
            } else {
                format!("   (target {target})")
            }
        );
        self.rows
            .push((metric.to_string(), target.to_string(), value));
    }

    /// The operator's requests of a phase by verb and resource, from both logs side by side
    /// (per `per.1` when given), the writes, the non-2xx answers, and where the logs differ.
    fn requests(&mut self, phase: &str, logs: &Logs, per: Option<(usize, &str)>) {
        let fake_counts = logs.fake.as_ref().map(|f| count_by(f, request_kind));
        let proxy_counts = count_by(&logs.proxy, request_kind);
        let mut keys: Vec<&String> = proxy_counts.keys().collect();
        if let Some(f) = &fake_counts {
            keys.extend(f.keys());
        }
        keys.sort();
        keys.dedup();
        let per_n = per.map(|(n, _)| n).filter(|n| *n > 0);
        let cell = |count: Option<usize>| match count {
            None => "–".to_string(),
            Some(c) => match per_n {
                Some(n) => format!("{} ({:.2})", thousands(c), c as f64 / n as f64),
                None => thousands(c),
            },
        };
        let mut lines = vec![
            format!(
                "requests, {phase}{}:",
                match per {
                    Some((n, unit)) => format!(" (in brackets: per {unit}, ÷ {})", thousands(n)),
                    None => String::new(),
                }
            ),
            "| verb resource | in-memory API server's log | proxy's log |".to_string(),
            "|---|---|---|".to_string(),
        ];
        let fake_total = logs.fake.as_ref().map(Vec::len);
        for k in &keys {
            let f = fake_counts
                .as_ref()
                .map(|f| f.get(*k).copied().unwrap_or(0));
            let p = proxy_counts.get(*k).copied().unwrap_or(0);
            lines.push(format!("| {k} | {} | {} |", cell(f), cell(Some(p))));
        }
        lines.push(format!(
            "| **total** | {} | {} |",
            cell(fake_total),
            cell(Some(logs.proxy.len()))
        ));
        let writes = |r: &[Rec]| r.iter().filter(|r| is_write(r)).count();
        lines.push(format!(
            "| writes (Secrets, */status, Events) | {} | {} |",
            cell(logs.fake.as_deref().map(writes)),
            cell(Some(writes(&logs.proxy)))
        ));
        let failed: Vec<Rec> = logs
            .proxy
            .iter()
            .filter(|r| !(200..300).contains(&r.status))
            .cloned()
            .collect();
        if !failed.is_empty() {
            lines.push(format!(
                "answered other than 2xx (proxy's log): {}",
                format_counts(
                    &count_by(&failed, |r| format!("{} {}", request_kind(r), r.status)),
                    None
                )
            ));
        }
        if logs.fake.is_none() {
            lines.push(
                "only the proxy counts on a real cluster (its API server keeps no log here)".into(),
            );
        } else {
            let diff = compare(logs);
            if diff.is_empty() {
                lines.push("the two logs hold the same requests".into());
            } else {
                lines.push("where the logs differ:".into());
                lines.extend(diff.into_iter().map(|d| format!("- {d}")));
            }
        }
        let table = lines.join("\n");
        println!("{table}");
        self.tables.push(table);
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self
            .rows
            .iter()
            .map(|r| r.1.len())
            .max()
            .unwrap_or(0)
            .max(6);
        println!("\n| {:w0$} | {:w1$} | value", "metric", "target");
        println!("|{}|{}|------", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
        for (m, t, v) in &self.rows {
            println!("| {m:w0$} | {t:w1$} | {v}");
        }
        for table in &self.tables {
            println!("\n{table}");
        }
    }
}

/// How many clients read their Secrets how often, and when the reads beyond two went relative
/// to the Secret watch (a fresh process reads what the watch cannot tell it yet):
/// `2 × 1,900, 3 × 100; beyond two: 80 before the Secret watch, 20 after`.
fn secret_reads(requests: &[Rec]) -> String {
    let watch_at = requests
        .iter()
        .find(|r| r.verb == "watch" && r.path.ends_with("/secrets"))
        .map(|r| r.at);
    let mut per_client: BTreeMap<String, Vec<SystemTime>> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.verb == "get") {
        let Some((_, name)) = r.path.split_once("/secrets/") else {
            continue;
        };
        let client = name
            .trim_end_matches("-token")
            .trim_end_matches("-credentials");
        per_client.entry(client.to_string()).or_default().push(r.at);
    }
    let mut histogram: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut before, mut after) = (0, 0);
    for reads in per_client.values() {
        *histogram.entry(reads.len()).or_insert(0) += 1;
        for at in reads.iter().skip(2) {
            match watch_at {
                Some(w) if *at >= w => after += 1,
                _ => before += 1,
            }
        }
    }
    let counts = histogram
        .iter()
        .map(|(reads, clients)| format!("{reads} × {clients}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{counts}; beyond two: {before} before the Secret watch, {after} after")
}

/// With `BENCH_TRACE=<name>`, prints the operator's requests about one client in a phase.
fn trace_client(phase: &str, requests: &[Rec]) {
    let Ok(name) = std::env::var("BENCH_TRACE") else {
        return;
    };
    println!("  trace of {name} in {phase}:");
    for r in requests
        .iter()
        .filter(|r| r.path.contains(&format!("/{name}")))
    {
        println!("    {} {} {}", r.verb, r.path, r.status);
    }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run() -> Result<()> {
    let s = Settings::from_env()?;
    let total = Instant::now();
    println!(
        "benchmark: {} clients ({} in the storm{}), {} unrelated 10 KB Secrets per client, \
         {} consents, idle window {} s, leader election {}; operator = {}",
        s.clients,
        s.storm_clients,
        if s.skip_storm { ", skipped" } else { "" },
        s.unrelated_per_client,
        s.consents,
        s.idle_secs,
        if s.leader_election { "on" } else { "off" },
        env!("CARGO_BIN_EXE_goto-oauth-operator")
    );
    let mut bench = Bench::start(s).await?;
    println!(
        "API server: {}; namespace {}",
        if bench.s.real_cluster {
            "the cluster in KUBECONFIG, through the counting proxy"
        } else {
            "in-memory, through the counting proxy"
        },
        bench.namespace
    );
    let mut report = Report::default();
    // From here on the namespace exists: whatever happens, it is cleaned up.
    let result = phases(&mut bench, &mut report).await;
    let cleaned = bench.cleanup().await;
    report.print();
    println!(
        "total benchmark time {:.0} s (noisy: 2 shared cores)",
        total.elapsed().as_secs_f64()
    );
    match (result, cleaned) {
        (Err(e), Err(c)) => Err(e.context(format!("and the clean-up failed too: {c:#}"))),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

async fn phases(bench: &mut Bench, report: &mut Report) -> Result<()> {
    baseline_phase(bench, report).await?;

    let started = Instant::now();
    println!("set-up: {} clients", bench.s.clients);
    add_clients(bench, bench.s.clients).await?;
    println!("set-up done in {:.1} s", started.elapsed().as_secs_f64());

    // Phases 1 to 2c share one operator process.
    bench.clear_logs();
    let operator = Operator::start(bench).await?;
    let idle_run = async {
        startup_phase(bench, &operator, report).await?;
        idle_phase(
            bench,
            &operator,
            Duration::from_secs(bench.s.idle_secs),
            report,
        )
        .await?;
        rotation_window_phase(bench, &operator, report).await?;
        consent_phase(bench, &operator, report).await
    }
    .await;
    // Clients the storm needs beyond those of phase 1 are added while this operator still
    // runs, so that they too have their status when the storm's operator starts.
    let more = bench.s.storm_clients.saturating_sub(bench.n());
    let grown = if idle_run.is_ok() && !bench.s.skip_storm && more > 0 {
        grow_for_storm(bench, &operator, more).await
    } else {
        Ok(())
    };
    let warnings = operator.stop().await?;
    idle_run?;
    grown?;
    report.row(
        "idle run: operator WARN/ERROR log lines",
        "",
        warnings.to_string(),
    );

    // Phase 3: a second operator run after every token became due.
    if !bench.s.skip_storm {
        storm_phase(bench, report).await?;
    }
    Ok(())
}

/// Adds `more` clients for the storm and waits until the running operator has made them all
/// Ready and scheduled, and is still.
async fn grow_for_storm(bench: &mut Bench, op: &Operator, more: usize) -> Result<()> {
    println!("set-up: {more} more clients for the storm");
    add_clients(bench, more).await?;
    let n = bench.n();
    let b: &Bench = bench;
    wait_for(
        &format!("all {n} clients Ready and scheduled"),
        Duration::from_secs(120) + Duration::from_millis(20 * n as u64),
        Duration::from_millis(500),
        || async {
            let (_, scheduled) = ready_counts(b).await?;
            Ok((scheduled == n).then_some(()))
        },
    )
    .await?;
    op.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    Ok(())
}

/// Phase 0: the operator with no clients at all, for the memory per client.
async fn baseline_phase(bench: &mut Bench, report: &mut Report) -> Result<()> {
    println!("phase 0: the operator with 0 clients");
    bench.clear_logs();
    let op = Operator::start(bench).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    op.settle(Duration::from_secs(2), Duration::from_secs(30))
        .await?;
    let mem = op.mem();
    report.row("0. 0 clients: steady memory", "", mem.show());
    let logs = bench.logs();
    report.requests("0. start-up with 0 clients", &logs, None);
    let warnings = op.stop().await?;
    if warnings > 0 {
        report.row(
            "0. 0 clients: operator WARN/ERROR log lines",
            "",
            warnings.to_string(),
        );
    }
    bench.baseline = Some(mem);
    Ok(())
}

/// Phase 1: start-up with every client authorized and fresh.
async fn startup_phase(bench: &Bench, op: &Operator, report: &mut Report) -> Result<()> {
    let n = bench.n();
    println!("phase 1: start-up with {n} authorized, fresh clients");
    // The logs were cleared just before the operator was spawned: all of it is start-up.
    let deadline = op.started + Duration::from_secs(120) + Duration::from_millis(20 * n as u64);
    let poll = Duration::from_millis(if n > 2_000 { 250 } else { 100 });
    let mut last_list: Option<Instant> = None;
    let mut ready_after = None;
    let bench_cpu_at_start = cpu_seconds("self");
    let (mut writes_seen, mut last_write) = (0, Instant::now());
    let scheduled_after = loop {
        let status_writes = bench.operator_count(|verb, path, status| {
            verb == "patch" && path.ends_with("/status") && status == 200
        });
        if status_writes > writes_seen {
            (writes_seen, last_write) = (status_writes, Instant::now());
        }
        // List when the status writes say it may be done, or when they have stopped for 5 s
        // (an operator may leave a status it already finds right alone). Not on a timer while
        // they come: a LIST of every client costs the in-memory API server the bench measures
        // against as much CPU as hundreds of the operator's requests.
        let stalled = last_write.elapsed() > Duration::from_secs(5);
        if status_writes >= n
            || (stalled && last_list.is_none_or(|t| t.elapsed() > Duration::from_secs(5)))
        {
            last_list = Some(Instant::now());
            let (ready, scheduled) = ready_counts(bench).await?;
            if ready == n && ready_after.is_none() {
                ready_after = Some(op.started.elapsed());
            }
            if scheduled == n {
                break op.started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not all clients Ready=True and scheduled within {:.0} s; log: {}",
                deadline.duration_since(op.started).as_secs_f64(),
                tail(&op.log_path, 20)
            );
        }
        tokio::time::sleep(poll).await;
    };
    report.row(
        "1. start-up: all Ready=True after",
        "",
        format!(
            "{:.1} s (from spawn)",
            ready_after.unwrap_or(scheduled_after).as_secs_f64()
        ),
    );
    report.row(
        "1. start-up: all Ready=True and scheduled (nextRefreshTime) after",
        if n >= 10_000 { "≤ 30 s" } else { "" },
        format!("{:.1} s (from spawn)", scheduled_after.as_secs_f64()),
    );
    // Who used the two cores until then: the operator, or the bench's in-memory API server
    // (with the fake GoTo and the proxy)?
    report.row(
        "1. start-up: CPU time until then",
        "",
        format!(
            "operator {:.1} s, bench process (in-memory API server, proxy, fake GoTo) {:.1} s",
            cpu_seconds(&op.pid.to_string()),
            cpu_seconds("self") - bench_cpu_at_start
        ),
    );
    let reconciles = op
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let logs = bench.logs();
    report.row("1. start-up: reconciles", "", reconciles.to_string());
    report.row(
        "1. start-up: API requests (proxy's log)",
        "",
        format!(
            "{} = {:.2} per client; by verb: {}",
            logs.proxy.len(),
            logs.proxy.len() as f64 / n.max(1) as f64,
            format_counts(&count_by(&logs.proxy, |r| r.verb.clone()), None)
        ),
    );
    report.row(
        "1. start-up: LISTs and their pages (proxy's log)",
        "",
        list_pages(&logs.proxy),
    );
    let writes: Vec<Rec> = logs.proxy.iter().filter(|r| is_write(r)).cloned().collect();
    report.row(
        "1. start-up: writes",
        "",
        format_counts(
            &count_by(&writes, |r| format!("{} {}", request_kind(r), r.status)),
            None,
        ),
    );
    report.requests("1. start-up", &logs, Some((n, "client")));
    let mem = op.mem();
    report.row("1. start-up: peak RSS (VmHWM)", "", mib(mem.hwm));
    report.row(
        "1. start-up: steady RSS (VmRSS, settled)",
        if n <= 1_000 {
            "≤ 20 MiB"
        } else if n >= 10_000 {
            "≤ 48 MiB"
        } else {
            ""
        },
        mem.show(),
    );
    report.row(
        "1. start-up: memory per client",
        "",
        per_client(mem, bench.baseline, n),
    );
    report.row("1. start-up: open fds (sampled every 50 ms)", "", op.fds());
    Ok(())
}

/// Phase 2: a reconcile of every client with nothing material changed, then an idle window.
async fn idle_phase(
    bench: &Bench,
    op: &Operator,
    window: Duration,
    report: &mut Report,
) -> Result<()> {
    println!(
        "phase 2: idle reconciles and a {} s idle window",
        window.as_secs()
    );
    let before = op.reconciles().await?;
    bench.clear_logs();
    let crs = bench.crs();
    let started = Instant::now();
    stream::iter(&bench.clients)
        .map(|c| {
            let crs = crs.clone();
            async move {
                let patch = serde_json::json!({"metadata": {"annotations": {"bench.goto-oauth.dev/poke": "1"}}});
                crs.patch(&c.obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let after = op
        .settle(Duration::from_secs(3), Duration::from_secs(120))
        .await?;
    let idle_reconciles = after.saturating_sub(before);
    let logs = bench.logs();
    let writes: Vec<Rec> = logs.proxy.iter().filter(|r| is_write(r)).cloned().collect();
    report.row(
        "2. idle: reconciles triggered by an annotation poke",
        "",
        format!(
            "{idle_reconciles} in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    report.row(
        "2. idle: API requests per idle reconcile (proxy's log)",
        "",
        format_counts(
            &count_by(&logs.proxy, request_kind),
            Some(idle_reconciles as usize),
        ),
    );
    report.row(
        "2. idle: writes per idle reconcile",
        "0",
        format!(
            "{:.3} ({} writes{})",
            writes.len() as f64 / idle_reconciles.max(1) as f64,
            writes.len(),
            if writes.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    format_counts(
                        &count_by(&writes, |r| format!("{} {}", request_kind(r), r.status)),
                        None
                    )
                )
            }
        ),
    );
    report.requests(
        "2. idle reconciles (one annotation poke per client)",
        &logs,
        Some((idle_reconciles as usize, "idle reconcile")),
    );
    trace_client("idle reconcile", &logs.proxy);

    bench.clear_logs();
    let rss_before = op.mem();
    tokio::time::sleep(window).await;
    let logs = bench.logs();
    let lists = logs.proxy.iter().filter(|r| r.verb == "list").count();
    report.row(
        &format!("2. idle: LIST calls in {} s", window.as_secs()),
        "0",
        lists.to_string(),
    );
    report.requests(
        &format!("2. idle window of {} s", window.as_secs()),
        &logs,
        None,
    );
    let mem = op.mem();
    report.row(
        "2. idle: RSS before / after the window",
        "",
        format!("{} / {}", mib(rss_before.rss), mem.show()),
    );
    report.row(
        "2. idle: memory per client after the window",
        "",
        per_client(mem, bench.baseline, bench.n()),
    );
    report.row("2. idle: peak RSS so far (VmHWM)", "", mib(mem.hwm));
    Ok(())
}

/// The operator's histogram of the rotation window: token response received → token Secret
/// write acknowledged.
const STORE_HISTOGRAM: &str = "goto_oauth_token_store_duration_seconds";
/// Refreshes forced one at a time in phase 2b.
const SINGLE_REFRESHES: usize = 50;

/// The `q` quantile of the observations between two readings of a histogram, interpolated
/// linearly inside its bucket; with the bucket's bounds, as the figure is only that precise.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<(f64, f64, f64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - was)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in delta {
        if count >= rank {
            let upper = if le.is_finite() { le } else { lower };
            let within = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return Some((lower + (upper - lower) * within, lower, upper));
        }
        (lower, below) = (le, count);
    }
    None
}

/// "median 2.1 ms (1.5–3 ms), p99 …, n = …" for a histogram's change.
fn window_figures(before: &[(f64, f64)], after: &[(f64, f64)]) -> String {
    let n = after.last().map_or(0.0, |(_, c)| *c) - before.last().map_or(0.0, |(_, c)| *c);
    let show = |q: f64| match quantile(before, after, q) {
        Some((v, lo, hi)) => format!("{:.1} ms ({:.1}–{:.1} ms)", v * 1e3, lo * 1e3, hi * 1e3),
        None => "n/a".to_string(),
    };
    format!("median {}, p99 {}, n = {n}", show(0.5), show(0.99))
}

/// Phase 2b: refreshes forced one at a time on the idle operator (the refresh-requested
/// annotation), measuring the rotation window without load.
async fn rotation_window_phase(bench: &Bench, op: &Operator, report: &mut Report) -> Result<()> {
    let count = SINGLE_REFRESHES.min(bench.n());
    println!("phase 2b: {count} refreshes, one at a time");
    let before = op.buckets(STORE_HISTOGRAM).await?;
    bench.clear_logs();
    let crs = bench.crs();
    let stored = |b: &[(f64, f64)]| b.last().map_or(0.0, |(_, c)| *c);
    // /metrics grows with the clients: read it less often when it is large.
    let poll = Duration::from_millis((bench.n() as u64 / 100).clamp(20, 200));
    for (i, c) in bench.clients.iter().take(count).enumerate() {
        let was = stored(&op.buckets(STORE_HISTOGRAM).await?);
        let patch = serde_json::json!({"metadata": {"annotations": {FORCE_REFRESH_ANNOTATION: format!("bench-{i}")}}});
        crs.patch(
            &c.obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(30);
        while stored(&op.buckets(STORE_HISTOGRAM).await?) <= was {
            if Instant::now() > until {
                bail!(
                    "forced refresh of {} not stored within 30 s",
                    c.obj.name_any()
                );
            }
            tokio::time::sleep(poll).await;
        }
    }
    let after = op.buckets(STORE_HISTOGRAM).await?;
    report.row(
        "2b. rotation window, one refresh at a time (response → Secret stored)",
        "",
        window_figures(&before, &after),
    );
    op.settle(Duration::from_secs(2), Duration::from_secs(30))
        .await?;
    let logs = bench.logs();
    report.requests(
        "2b. forced refreshes, one at a time (annotation → settled)",
        &logs,
        Some((count, "refresh")),
    );
    Ok(())
}

/// A cookie jar for one browser: keeps the operator's cookies (the binding cookie), sends them
/// back on the next request. Only the operator is asked through it; the fake GoTo's consent
/// page is answered by `fake_goto::consent`, which needs no cookie.
#[derive(Default)]
struct Jar(Vec<String>);

impl Jar {
    async fn get(&mut self, http: &reqwest::Client, url: &str) -> Result<reqwest::Response> {
        let mut request = http.get(url);
        if !self.0.is_empty() {
            request = request.header(http::header::COOKIE, self.0.join("; "));
        }
        let response = request.send().await?;
        for value in response.headers().get_all(http::header::SET_COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            let pair = value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            let name = pair.split('=').next().unwrap_or_default().to_string();
            self.0
                .retain(|c| c.split('=').next() != Some(name.as_str()));
            self.0.push(pair);
        }
        Ok(response)
    }
}

fn location(response: &reqwest::Response) -> Result<String> {
    response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("a {} without a Location header", response.status()))
}

/// Polls `check` every `poll` until it returns `Some`, for at most `within`.
async fn wait_for<T, F, Fut>(
    what: &str,
    within: Duration,
    poll: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let until = Instant::now() + within;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > until {
            bail!("{what}: not within {} s", within.as_secs());
        }
        tokio::time::sleep(poll).await;
    }
}

/// Phase 2c: consents through the HTTP flow, one at a time, against the running operator:
/// the link (with a cookie jar) → GoTo's consent page, Allow → the operator's /callback →
/// tokens stored → the client Ready and scheduled → the operator still.
async fn consent_phase(bench: &Bench, op: &Operator, report: &mut Report) -> Result<()> {
    let k = bench.s.consents;
    if k == 0 {
        return Ok(());
    }
    println!("phase 2c: {k} consents through the HTTP flow");
    let names: Vec<String> = (0..k).map(|i| format!("consent-{i:03}")).collect();

    // New clients, until each publishes its link.
    bench.clear_logs();
    for (i, name) in names.iter().enumerate() {
        let client_id = format!("bench-consent-{i:03}");
        let client_secret = fake_goto::sample_client_secret();
        bench.goto.register_client(ClientRegistration {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            redirect_uris: vec![bench.redirect_uri.clone()],
            scopes: vec!["identity:".into(), "call-control.v1.calls.control".into()],
            name: format!("bench consent {i}"),
        });
        create_client_objects(bench, name, &client_id, client_secret).await?;
    }
    let crs = bench.crs();
    let mut links = Vec::with_capacity(k);
    for name in &names {
        let link = wait_for(
            &format!("{name} publishes its link"),
            Duration::from_secs(60),
            Duration::from_millis(20),
            || async {
                Ok(crs
                    .get(name)
                    .await?
                    .status
                    .and_then(|s| s.authorization_url))
            },
        )
        .await?;
        links.push(link);
    }
    op.settle(Duration::from_secs(2), Duration::from_secs(30))
        .await?;
    let logs = bench.logs();
    report.requests(
        "2c. a new client until its link is published",
        &logs,
        Some((k, "client")),
    );

    // The consents, one at a time.
    bench.clear_logs();
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?;
    let secrets = bench.secrets();
    let (mut to_stored, mut to_ready, mut per_consent) = (Vec::new(), Vec::new(), Vec::new());
    for (name, link) in names.iter().zip(&links) {
        let before = bench.operator_count(|_, _, _| true);
        let started = Instant::now();
        let mut jar = Jar::default();
        let opened = jar.get(&http, link).await?;
        if opened.status() != reqwest::StatusCode::FOUND {
            bail!(
                "the link of {name} answered {}, not a redirect to GoTo",
                opened.status()
            );
        }
        let goto_url = location(&opened)?;
        let mut url = fake_goto::consent(&goto_url, Decision::Allow)
            .await
            .map_err(|e| anyhow!("GoTo's consent page for {name}: {e}"))?;
        // Back to the operator's /callback, following its own redirects.
        let mut answered = None;
        for _ in 0..5 {
            let response = jar.get(&http, &url).await?;
            if response.status().is_redirection() {
                let next = location(&response)?;
                url = reqwest::Url::parse(&url)?.join(&next)?.to_string();
                continue;
            }
            answered = Some(response.status());
            break;
        }
        match answered {
            Some(status) if status.is_success() => {}
            Some(status) => bail!("the callback for {name} answered {status}"),
            None => bail!("the callback for {name} redirected more than 5 times"),
        }
        let secret_name = format!("{name}-token");
        wait_for(
            &format!("{name}'s tokens stored"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                Ok(secrets.get_opt(&secret_name).await?.filter(|s| {
                    s.data
                        .as_ref()
                        .and_then(|d| d.get(ACCESS_TOKEN_KEY))
                        .is_some_and(|v| !v.0.is_empty())
                }))
            },
        )
        .await?;
        to_stored.push(started.elapsed());
        wait_for(
            &format!("{name} Ready and scheduled"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                let obj = crs.get(name).await?;
                let ready = obj.condition("Ready").is_some_and(|c| c.status == "True");
                let scheduled = obj
                    .status
                    .as_ref()
                    .is_some_and(|s| s.next_refresh_time.is_some());
                Ok((ready && scheduled).then_some(()))
            },
        )
        .await?;
        to_ready.push(started.elapsed());
        op.settle(Duration::from_secs(1), Duration::from_secs(30))
            .await?;
        per_consent.push(bench.operator_count(|_, _, _| true) - before);
    }
    let logs = bench.logs();
    report.row(
        "2c. consent: link opened → tokens stored",
        "",
        median_max(&to_stored),
    );
    report.row(
        "2c. consent: link opened → Ready and scheduled",
        "",
        median_max(&to_ready),
    );
    let (min, max) = (
        per_consent.iter().min().copied().unwrap_or(0),
        per_consent.iter().max().copied().unwrap_or(0),
    );
    report.row(
        "2c. consent: API requests per consent (proxy's log; link opened → settled)",
        "≤ 6",
        format!(
            "{:.2} (min {min}, max {max}, n = {k}); by verb: {}",
            logs.proxy.len() as f64 / k as f64,
            format_counts(&count_by(&logs.proxy, |r| r.verb.clone()), Some(k))
        ),
    );
    report.requests(
        "2c. consents (link opened → tokens stored → settled)",
        &logs,
        Some((k, "consent")),
    );
    if let Ok(name) = std::env::var("BENCH_TRACE")
        && name.starts_with("consent-")
    {
        trace_client("consent", &logs.proxy);
    }

    // The consent clients go again, so that the storm is about the bench clients only.
    for name in &names {
        crs.delete(name, &DeleteParams::background()).await?;
        secrets
            .delete(&format!("{name}-credentials"), &DeleteParams::default())
            .await?;
    }
    for name in &names {
        let secret_name = format!("{name}-token");
        wait_for(
            &format!("{name} and its token Secret deleted"),
            Duration::from_secs(120),
            Duration::from_millis(20),
            || async {
                Ok((crs.get_opt(name).await?.is_none()
                    && secrets.get_opt(&secret_name).await?.is_none())
                .then_some(()))
            },
        )
        .await?;
    }
    op.settle(Duration::from_secs(2), Duration::from_secs(30))
        .await?;
    Ok(())
}

/// Phase 3: every token due at once, GoTo limited to 10 req/s, a fresh operator process.
async fn storm_phase(bench: &Bench, report: &mut Report) -> Result<()> {
    let n = bench.n();
    println!("phase 3: refresh storm, {n} due tokens, provider limit {PROVIDER_RATE_LIMIT} req/s");
    // issued 50 min ago with 60 min lifetime: expires in 10 min, past the 2/3 refresh point.
    let issued_at = Timestamp::now() - SignedDuration::from_mins(50);
    put_token_secrets(bench, &bench.clients, issued_at).await?;
    let old_tokens: HashMap<String, Vec<u8>> = bench
        .clients
        .iter()
        .map(|c| {
            (
                format!("{}-token", c.obj.name_any()),
                c.tokens.access_token.expose_secret().as_bytes().to_vec(),
            )
        })
        .collect();
    bench.goto.set_rate_limit(Some(PROVIDER_RATE_LIMIT));
    bench.goto.reset_max_in_flight();
    let token_requests_before = bench.goto.token_requests().len();
    let limited_before = bench.goto.rate_limited_count();
    bench.clear_logs();

    let op = Operator::start(bench).await?;
    let secrets = bench.secrets();
    // n / 10 s at best; half as long again, and a minute.
    let deadline = op.started
        + Duration::from_secs(60)
        + Duration::from_millis(1_500 * n as u64 / u64::from(PROVIDER_RATE_LIMIT));
    let mut next_progress = Instant::now() + Duration::from_secs(15);
    let selector = format!("app.kubernetes.io/managed-by={MANAGER}");
    let done_after = loop {
        let secret_writes = bench.operator_count(|verb, path, status| {
            verb == "patch" && path.contains("/secrets/") && status == 200
        });
        if Instant::now() > next_progress {
            println!(
                "  … {:.0} s: {secret_writes} Secret writes, {} 429s",
                op.started.elapsed().as_secs_f64(),
                bench.goto.rate_limited_count() - limited_before
            );
            next_progress += Duration::from_secs(15);
        }
        if secret_writes >= n {
            let mut params = ListParams::default().labels(&selector).limit(PAGE);
            let mut renewed = 0;
            loop {
                let page = secrets.list(&params).await?;
                renewed += page
                    .items
                    .iter()
                    .filter(|s| {
                        let Some(old) = old_tokens.get(&s.name_any()) else {
                            return false;
                        };
                        s.data
                            .as_ref()
                            .and_then(|d| d.get(ACCESS_TOKEN_KEY))
                            .is_some_and(|v| !v.0.is_empty() && v.0 != *old)
                    })
                    .count();
                match page.metadata.continue_ {
                    Some(token) if !token.is_empty() => params = params.continue_token(&token),
                    _ => break,
                }
            }
            if renewed == n {
                break op.started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not all tokens refreshed within {:.0} s; log: {}",
                deadline.duration_since(op.started).as_secs_f64(),
                tail(&op.log_path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reconciles = op
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    // A fresh process: its histogram holds the storm's refreshes only.
    let window = window_figures(&[], &op.buckets(STORE_HISTOGRAM).await?);
    let logs = bench.logs();
    let writes: Vec<Rec> = logs.proxy.iter().filter(|r| is_write(r)).cloned().collect();
    let token_requests: Vec<_> = bench
        .goto
        .token_requests()
        .into_iter()
        .skip(token_requests_before)
        .collect();
    let refreshes: Vec<_> = token_requests
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
        .collect();
    let ok = refreshes.iter().filter(|r| r.status == 200).count();
    let span = match (refreshes.first(), refreshes.last()) {
        (Some(a), Some(b)) => b.at.saturating_duration_since(a.at),
        _ => Duration::ZERO,
    };
    let first_after = refreshes
        .first()
        .map(|r| r.at.saturating_duration_since(op.started.into()))
        .unwrap_or_default();
    // The issue's target for 1,000 is 110 s: 100 s at 10 req/s and 10 % more.
    let target_time = if n >= 1_000 {
        format!("≤ {} s", n * 110 / 1_000)
    } else {
        String::new()
    };
    report.row(
        &format!("3. storm of {n}: all Secrets hold a new access token after"),
        &target_time,
        format!("{:.1} s (from spawn)", done_after.as_secs_f64()),
    );
    report.row(
        "3. storm: token requests",
        "",
        format!(
            "{} refresh ({} × 200), first {:.1} s after spawn, first→last {:.1} s = {:.2} req/s",
            refreshes.len(),
            ok,
            first_after.as_secs_f64(),
            span.as_secs_f64(),
            if span.is_zero() {
                0.0
            } else {
                (refreshes.len().saturating_sub(1)) as f64 / span.as_secs_f64()
            }
        ),
    );
    report.row(
        "3. storm: rotation window (response → Secret stored)",
        "",
        window,
    );
    report.row(
        "3. storm: 429s from the provider",
        "0",
        (bench.goto.rate_limited_count() - limited_before).to_string(),
    );
    report.row(
        "3. storm: max in-flight token requests",
        "",
        bench.goto.max_in_flight().to_string(),
    );
    report.row("3. storm: reconciles", "", reconciles.to_string());
    report.row(
        "3. storm: API requests per refresh (proxy's log)",
        "≤ 4",
        format!(
            "{:.2} ({} in all); by verb: {}",
            logs.proxy.len() as f64 / n as f64,
            logs.proxy.len(),
            format_counts(&count_by(&logs.proxy, |r| r.verb.clone()), Some(n))
        ),
    );
    report.row(
        "3. storm: writes per refresh",
        "≤ 2",
        format!(
            "{:.2} ({})",
            writes.len() as f64 / n as f64,
            format_counts(
                &count_by(&writes, |r| format!("{} {}", request_kind(r), r.status)),
                None
            )
        ),
    );
    report.requests(
        &format!("3. storm of {n} (spawn → all refreshed → settled)"),
        &logs,
        Some((n, "refresh")),
    );
    report.row(
        "3. storm: Secret reads per client (a fresh process reads two)",
        "",
        secret_reads(&logs.proxy),
    );
    trace_client("storm", &logs.proxy);
    let mem = op.mem();
    report.row(
        "3. storm: peak RSS (VmHWM)",
        if n == 1_000 { "≤ 20 MiB" } else { "" },
        mib(mem.hwm),
    );
    report.row(
        "3. storm: highest sampled VmRSS (50 ms)",
        "",
        mib(op.sampled_peak()),
    );
    report.row("3. storm: steady RSS (VmRSS, settled)", "", mem.show());
    report.row(
        "3. storm: memory per client (settled)",
        "",
        per_client(mem, bench.baseline, n),
    );
    report.row("3. storm: open fds (sampled every 50 ms)", "", op.fds());
    // What the storm leaves behind once nothing is due: phase 2's idle window again.
    let window = Duration::from_secs(bench.s.idle_secs);
    tokio::time::sleep(window).await;
    report.row(
        &format!("3. storm: RSS after another {} s idle", window.as_secs()),
        if n == 1_000 { "≤ 20 MiB" } else { "" },
        op.mem().show(),
    );
    let warnings = op.stop().await?;
    report.row(
        "3. storm: operator WARN/ERROR log lines",
        "",
        warnings.to_string(),
    );
    Ok(())
}
