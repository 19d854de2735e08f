//! `cargo bench --bench operator`: the real operator binary against 1,000 clients.
//!
//! The operator runs as a child process (the release-profile binary, as deployed) against the
//! in-memory API server and the fake GoTo provider, both hosted in this process. The operator
//! and this process reach the API server through `kube-fault-proxy`, whose request log does the
//! counting (no faults are injected; the proxy costs one more loopback hop per request). What is
//! measured is mostly counted, not timed — API requests by verb, writes, 429s — because counts
//! do not depend on how busy the (shared, 2-core) machine is; the times and RSS figures are
//! printed alongside. See BENCHMARKS.md for the phases, the targets and the latest results.
//!
//! Set-up skips the consent flow: tokens come straight from the fake provider and each client's
//! token Secret is pre-created exactly as the operator would write it (`desired_secret`, applied
//! under the operator's field manager), so the phases measure the steady-state operator, not the
//! deliberately rate-limited code exchange.
//!
//! Without `--bench` (i.e. under `cargo test --all-targets`) it only prints a line and exits.
//!
//! Environment knobs (for quick local runs): `BENCH_CLIENTS` (default 1000), `BENCH_IDLE_SECS`
//! (default 30), `BENCH_SHOW_LOGS=1` (print the operator's log at the end), `BENCH_TRACE=<name>`
//! (print the operator's requests about one client per phase), `BENCH_SKIP_STORM=1`.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use fake_apiserver::FakeApiServer;
use fake_goto::{ClientRegistration, FakeGoTo, FakeGoToConfig};
use futures::{StreamExt, TryStreamExt, stream};
use goto_oauth_operator::{
    goto::protocol::{TokenResponse, basic_authorization},
    resource::{FORCE_REFRESH_ANNOTATION, GoToOAuthClient, MANAGER},
    secret::{ACCESS_TOKEN_KEY, StoredTokens, desired_secret},
    validation::{Defaults, validate},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, CustomResourceExt, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use kube_fault_proxy::{FaultProxy, LoggedRequest};
use secrecy::ExposeSecret;

/// Requests this process sends carry this User-Agent, so the request log separates them from
/// the operator's (kube-rs sends none by default).
const BENCH_UA: &str = "goto-oauth-bench";
const NAMESPACE: &str = "bench";
/// Parallel set-up requests: enough to keep the in-process API server busy on 2 cores.
const SETUP_CONCURRENCY: usize = 8;
/// GoTo's documented token-endpoint limit.
const PROVIDER_RATE_LIMIT: u32 = 10;
/// How long a phase may take before the benchmark gives up on it.
const STARTUP_DEADLINE: Duration = Duration::from_secs(120);
const STORM_DEADLINE: Duration = Duration::from_secs(180);

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

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One client as set up: its resource (with uid), settings and the tokens first stored.
struct BenchClient {
    obj: GoToOAuthClient,
    tokens: TokenResponse,
}

/// Everything the phases share.
struct Bench {
    n: usize,
    /// Counts the requests; the in-memory API server behind it lives as long as the bench.
    proxy: FaultProxy,
    _fake: FakeApiServer,
    goto: FakeGoTo,
    client: Client,
    defaults: Defaults,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    port: u16,
    metrics_port: u16,
    clients: Vec<BenchClient>,
}

impl Bench {
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    fn crs(&self) -> Api<GoToOAuthClient> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// The operator's requests since the log was last cleared.
    fn operator_requests(&self) -> Vec<LoggedRequest> {
        self.proxy
            .request_log()
            .into_iter()
            .filter(|r| r.user_agent.as_deref() != Some(BENCH_UA))
            .collect()
    }
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

async fn run() -> Result<()> {
    let n = usize::try_from(env_number("BENCH_CLIENTS", 1000)?)?;
    let idle_secs = env_number("BENCH_IDLE_SECS", 30)?;
    let total = Instant::now();
    println!(
        "benchmark: {n} clients, idle window {idle_secs} s; operator = {}",
        env!("CARGO_BIN_EXE_goto-oauth-operator")
    );

    let bench = setup(n).await?;
    println!("set-up done in {:.1} s", total.elapsed().as_secs_f64());

    let mut report = Report::default();

    // Phase 1 and 2 share one operator process.
    bench.proxy.clear_request_log();
    let operator = Operator::start(&bench).await?;
    startup_phase(&bench, &operator, &mut report).await?;
    idle_phase(
        &bench,
        &operator,
        Duration::from_secs(idle_secs),
        &mut report,
    )
    .await?;
    rotation_window_phase(&bench, &operator, &mut report).await?;
    let warnings = operator.stop().await?;
    report.row(
        "idle run: operator WARN/ERROR log lines",
        "",
        warnings.to_string(),
    );

    // Phase 3: a second operator run after every token became due.
    if std::env::var_os("BENCH_SKIP_STORM").is_none() {
        storm_phase(&bench, &mut report).await?;
    }

    report.print();
    println!(
        "total benchmark time {:.0} s (noisy: 2 shared cores)",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts the fake API server and provider, and creates `n` authorized clients whose tokens
/// are fresh.
async fn setup(n: usize) -> Result<Bench> {
    let fake = FakeApiServer::start().await;
    let proxy = FaultProxy::start(fake.client()).await?;
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
    .map_err(|e| anyhow!(e))?;
    fake_apiserver::create_namespace(&client, NAMESPACE)
        .await
        .map_err(|e| anyhow!(e))?;

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

    // Tokens straight from the provider, one exchange at a time so the provider's
    // max-in-flight figure afterwards belongs to the operator.
    let started = Instant::now();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut registered = Vec::with_capacity(n);
    for i in 0..n {
        let client_id = format!("bench-client-{i:04}");
        let client_secret = fake_goto::sample_client_secret();
        goto.register_client(ClientRegistration {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            redirect_uris: vec![redirect_uri.clone()],
            scopes: vec!["identity:".into(), "call-control.v1.calls.control".into()],
            name: format!("bench {i}"),
        });
        let code = goto
            .issue_code(&client_id, &redirect_uri)
            .map_err(|e| anyhow!(e))?;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", &code)
            .append_pair("redirect_uri", &redirect_uri)
            .finish();
        let response = http
            .post(goto.token_url())
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
        registered.push((i, client_id, client_secret, tokens));
    }
    println!(
        "  {n} code exchanges at the provider: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Client-secret Secrets and the resources, then the token Secrets (they need the uid).
    let started = Instant::now();
    let crs: Api<GoToOAuthClient> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut clients: Vec<BenchClient> = stream::iter(registered)
        .map(|(i, client_id, client_secret, tokens)| {
            let crs = crs.clone();
            let secrets = secrets.clone();
            async move {
                let name = format!("client-{i:04}");
                let creds = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-credentials")),
                        ..Default::default()
                    },
                    string_data: Some([("clientSecret".to_string(), client_secret)].into()),
                    ..Default::default()
                };
                secrets.create(&PostParams::default(), &creds).await?;
                let obj: GoToOAuthClient = serde_json::from_value(serde_json::json!({
                    "apiVersion": "goto-oauth.dev/v1alpha1",
                    "kind": "GoToOAuthClient",
                    "metadata": {"name": name},
                    "spec": {
                        "clientId": client_id,
                        "clientSecretRef": {"name": format!("{name}-credentials")},
                    },
                }))?;
                let obj = crs.create(&PostParams::default(), &obj).await?;
                anyhow::Ok(BenchClient { obj, tokens })
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    clients.sort_by_key(|c| c.obj.name_any());

    let mut bench = Bench {
        n,
        proxy,
        _fake: fake,
        goto,
        client,
        defaults,
        dir,
        kubeconfig,
        port,
        metrics_port,
        clients,
    };
    put_token_secrets(&bench, Timestamp::now()).await?;
    println!(
        "  {n} × (client Secret, GoToOAuthClient, token Secret) created: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    bench.clients.shrink_to_fit();
    Ok(bench)
}

/// Writes every client's token Secret as the operator would have written it at `issued_at`:
/// the same builder, server-side apply under the operator's field manager.
async fn put_token_secrets(bench: &Bench, issued_at: Timestamp) -> Result<()> {
    let secrets = bench.secrets();
    stream::iter(&bench.clients)
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

/// The operator binary as a child process, with an RSS sampler.
struct Operator {
    child: tokio::process::Child,
    pid: u32,
    log_path: PathBuf,
    started: Instant,
    metrics_url: String,
    http: reqwest::Client,
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
            .arg(NAMESPACE)
            .arg("--operator-namespace")
            .arg(NAMESPACE)
            .arg("--authorize-url")
            .arg(bench.goto.authorize_url())
            .arg("--token-url")
            .arg(bench.goto.token_url())
            .arg("--leader-election=false")
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
                    if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                        let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                        *p = (*p).max(kib);
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
            http: reqwest::Client::builder().no_proxy().build()?,
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

    fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS").unwrap_or(0)
    }

    fn hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM").unwrap_or(0)
    }

    /// Current RSS split: anonymous (heap, stacks) / file-backed (the binary's pages).
    fn rss_split(&self) -> String {
        format!(
            "anon {} + file {}",
            mib(proc_status_kib(self.pid, "RssAnon").unwrap_or(0)),
            mib(proc_status_kib(self.pid, "RssFile").unwrap_or(0))
        )
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

    /// A counter or histogram `_count` from /metrics (sum over label sets).
    async fn metric(&self, name: &str) -> Result<f64> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?;
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
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await?
            .text()
            .await?;
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

    /// Waits until the reconcile count has not moved for `quiet`; returns it.
    async fn settle(&self, quiet: Duration, deadline: Duration) -> Result<u64> {
        let until = Instant::now() + deadline;
        let mut last = self.reconciles().await?;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
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
        if std::env::var_os("BENCH_SHOW_LOGS").is_some() {
            println!("--- operator log ---\n{log}\n--- end ---");
        }
        Ok(log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count())
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
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
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `verb resource[/subresource]` of a logged request, e.g. `get secrets`, `patch gotooauthclients/status`.
fn request_kind(r: &LoggedRequest) -> String {
    let segments: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let resource = match segments.iter().position(|s| *s == "namespaces") {
        Some(i) if segments.len() > i + 2 => {
            let mut res = segments[i + 2].to_string();
            if segments.len() > i + 4 {
                res = format!("{res}/{}", segments[i + 4]);
            }
            res
        }
        _ => r.path.clone(),
    };
    format!("{} {}", r.verb, resource)
}

/// [`request_kind`] plus the response status, for writes (a 409 is a lost conditional write).
fn write_kind(r: &LoggedRequest) -> String {
    format!("{} {}", request_kind(r), r.status)
}

/// With `BENCH_TRACE=<name>`, prints the operator's requests about one client in a phase.
fn trace_client(phase: &str, requests: &[LoggedRequest]) {
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

fn is_write(r: &LoggedRequest) -> bool {
    matches!(
        r.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    ) && (r.path.ends_with("/status") || r.path.contains("/secrets") || r.path.contains("/events"))
}

fn count_by<F: Fn(&LoggedRequest) -> String>(
    requests: &[LoggedRequest],
    key: F,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in requests {
        *out.entry(key(r)).or_insert(0) += 1;
    }
    out
}

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

/// Result rows, printed as a table at the end.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
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
    }
}

/// Phase 1: start-up with every client authorized and fresh.
async fn startup_phase(bench: &Bench, op: &Operator, report: &mut Report) -> Result<()> {
    println!(
        "phase 1: start-up with {} authorized, fresh clients",
        bench.n
    );
    // The log was cleared just before the operator was spawned: all of it is start-up.
    let crs = bench.crs();
    let deadline = op.started + STARTUP_DEADLINE;
    let ready_after = loop {
        let status_writes = bench
            .operator_requests()
            .iter()
            .filter(|r| r.verb == "patch" && r.path.ends_with("/status") && r.status == 200)
            .count();
        if status_writes >= bench.n {
            let list = crs.list(&Default::default()).await?;
            let ready = list
                .items
                .iter()
                .filter(|c| c.condition("Ready").is_some_and(|c| c.status == "True"))
                .count();
            if ready == bench.n {
                break op.started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not all clients Ready=True within {STARTUP_DEADLINE:?}; log: {}",
                tail(&op.log_path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    report.row(
        "1. start-up: all Ready=True after",
        "",
        format!("{:.1} s (from spawn)", ready_after.as_secs_f64()),
    );
    let reconciles = op
        .settle(Duration::from_secs(3), Duration::from_secs(30))
        .await?;
    let requests = bench.operator_requests();
    report.row("1. start-up: reconciles", "", reconciles.to_string());
    report.row(
        "1. start-up: API requests (total)",
        "",
        requests.len().to_string(),
    );
    report.row(
        "1. start-up: API requests by verb",
        "",
        format_counts(&count_by(&requests, |r| r.verb.clone()), None),
    );
    report.row(
        "1. start-up: API requests by kind",
        "",
        format_counts(&count_by(&requests, request_kind), None),
    );
    let writes: Vec<LoggedRequest> = requests.iter().filter(|r| is_write(r)).cloned().collect();
    report.row(
        "1. start-up: writes",
        "",
        format_counts(&count_by(&writes, write_kind), None),
    );
    report.row(
        "1. start-up: peak RSS (VmHWM)",
        "≤ 20 MiB",
        mib(op.hwm_kib()),
    );
    report.row(
        "1. start-up: steady RSS (VmRSS, settled)",
        "≤ 20 MiB",
        format!("{} ({})", mib(op.rss_kib()), op.rss_split()),
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
    bench.proxy.clear_request_log();
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
        .settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let idle_reconciles = after.saturating_sub(before);
    let requests = bench.operator_requests();
    let writes: Vec<LoggedRequest> = requests.iter().filter(|r| is_write(r)).cloned().collect();
    report.row(
        "2. idle: reconciles triggered by an annotation poke",
        "",
        format!(
            "{idle_reconciles} in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    report.row(
        "2. idle: API requests per idle reconcile",
        "",
        format_counts(
            &count_by(&requests, request_kind),
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
                format!(": {}", format_counts(&count_by(&writes, write_kind), None))
            }
        ),
    );

    trace_client("idle reconcile", &requests);
    bench.proxy.clear_request_log();
    let rss_before = op.rss_kib();
    tokio::time::sleep(window).await;
    let requests = bench.operator_requests();
    let lists = requests.iter().filter(|r| r.verb == "list").count();
    report.row(
        &format!("2. idle: LIST calls in {} s", window.as_secs()),
        "0",
        lists.to_string(),
    );
    report.row(
        &format!("2. idle: all requests in {} s", window.as_secs()),
        "",
        if requests.is_empty() {
            "none".into()
        } else {
            format_counts(&count_by(&requests, request_kind), None)
        },
    );
    report.row(
        "2. idle: RSS before / after the window",
        "≤ 20 MiB",
        format!("{} / {}", mib(rss_before), mib(op.rss_kib())),
    );
    report.row(
        "2. idle: peak RSS so far (VmHWM)",
        "≤ 20 MiB",
        mib(op.hwm_kib()),
    );
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
    println!("phase 2b: {SINGLE_REFRESHES} refreshes, one at a time");
    let before = op.buckets(STORE_HISTOGRAM).await?;
    let crs = bench.crs();
    let count = |b: &[(f64, f64)]| b.last().map_or(0.0, |(_, c)| *c);
    for (i, c) in bench.clients.iter().take(SINGLE_REFRESHES).enumerate() {
        let was = count(&op.buckets(STORE_HISTOGRAM).await?);
        let patch = serde_json::json!({"metadata": {"annotations": {FORCE_REFRESH_ANNOTATION: format!("bench-{i}")}}});
        crs.patch(
            &c.obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(30);
        while count(&op.buckets(STORE_HISTOGRAM).await?) <= was {
            if Instant::now() > until {
                bail!(
                    "forced refresh of {} not stored within 30 s",
                    c.obj.name_any()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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
    Ok(())
}

/// Phase 3: every token due at once, GoTo limited to 10 req/s, a fresh operator process.
async fn storm_phase(bench: &Bench, report: &mut Report) -> Result<()> {
    println!(
        "phase 3: refresh storm, {} due tokens, provider limit {PROVIDER_RATE_LIMIT} req/s",
        bench.n
    );
    // issued 50 min ago with 60 min lifetime: expires in 10 min, past the 2/3 refresh point.
    let issued_at = Timestamp::now() - SignedDuration::from_mins(50);
    put_token_secrets(bench, issued_at).await?;
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
    let token_requests_before = bench.goto.token_requests().len();
    let limited_before = bench.goto.rate_limited_count();
    bench.proxy.clear_request_log();

    let op = Operator::start(bench).await?;
    let secrets = bench.secrets();
    let deadline = op.started + STORM_DEADLINE;
    let mut next_progress = Instant::now() + Duration::from_secs(15);
    let done_after = loop {
        let secret_writes = bench
            .operator_requests()
            .iter()
            .filter(|r| r.verb == "patch" && r.path.contains("/secrets/") && r.status == 200)
            .count();
        if Instant::now() > next_progress {
            println!(
                "  … {:.0} s: {secret_writes} Secret writes, {} 429s",
                op.started.elapsed().as_secs_f64(),
                bench.goto.rate_limited_count() - limited_before
            );
            next_progress += Duration::from_secs(15);
        }
        if secret_writes >= bench.n {
            let list = secrets.list(&Default::default()).await?;
            let renewed = list
                .items
                .iter()
                .filter(|s| {
                    let name = s.name_any();
                    let Some(old) = old_tokens.get(&name) else {
                        return false;
                    };
                    s.data
                        .as_ref()
                        .and_then(|d| d.get(ACCESS_TOKEN_KEY))
                        .is_some_and(|v| !v.0.is_empty() && v.0 != *old)
                })
                .count();
            if renewed == bench.n {
                break op.started.elapsed();
            }
        }
        if Instant::now() > deadline {
            bail!(
                "not all tokens refreshed within {STORM_DEADLINE:?}; log: {}",
                tail(&op.log_path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reconciles = op
        .settle(Duration::from_secs(3), Duration::from_secs(30))
        .await?;
    // A fresh process: its histogram holds the storm's refreshes only.
    let window = window_figures(&[], &op.buckets(STORE_HISTOGRAM).await?);
    let requests = bench.operator_requests();
    let writes: Vec<LoggedRequest> = requests.iter().filter(|r| is_write(r)).cloned().collect();
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
    let n = bench.n;
    report.row(
        "3. storm: all Secrets hold a new access token after",
        "≤ 110 s",
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
        "3. storm: API requests (total)",
        "",
        format!(
            "{} = {:.2} per refresh",
            requests.len(),
            requests.len() as f64 / n as f64
        ),
    );
    report.row(
        "3. storm: API requests per refresh by verb",
        "",
        format_counts(&count_by(&requests, |r| r.verb.clone()), Some(n)),
    );
    report.row(
        "3. storm: API requests per refresh by kind",
        "",
        format_counts(&count_by(&requests, request_kind), Some(n)),
    );
    report.row(
        "3. storm: writes per refresh",
        "≤ 2",
        format!(
            "{:.2} ({})",
            writes.len() as f64 / n as f64,
            format_counts(&count_by(&writes, write_kind), None)
        ),
    );
    trace_client("storm", &requests);
    report.row("3. storm: peak RSS (VmHWM)", "≤ 20 MiB", mib(op.hwm_kib()));
    report.row(
        "3. storm: highest sampled VmRSS (50 ms)",
        "≤ 20 MiB",
        mib(*op
            .sampled_peak_kib
            .lock()
            .unwrap_or_else(|e| e.into_inner())),
    );
    report.row(
        "3. storm: steady RSS (VmRSS, settled)",
        "≤ 20 MiB",
        format!("{} ({})", mib(op.rss_kib()), op.rss_split()),
    );
    report.row("3. storm: open fds (sampled every 50 ms)", "", op.fds());
    let warnings = op.stop().await?;
    report.row(
        "3. storm: operator WARN/ERROR log lines",
        "",
        warnings.to_string(),
    );
    Ok(())
}
